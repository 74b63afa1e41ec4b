"""What the status page costs the daemon: CPU with the page open and streaming, and memory.

Two daemons run side by side on the same config for the same window, so they share the
machine's noise; one has a page client attached to /events (curl: the daemon sends a browser
and curl the same bytes), the other none. The roles swap every round and the figure is the mean
difference (with page - without), so a difference between the two processes cancels out.

  cpu   the bench's emulated hardware (make run's devices: BME280, SHT3x, ADS1115, two Modbus
        meters, GPS, relay boards) and a jsonl uplink. Target: <= 0.2 % of a core added.
  rss   50 devices x 20 points, one reading per 5 s bucket; the recent-values store holds its
        full 10 minutes from the first reading (its arrays are allocated whole). Measured twice:
        the store on its own, filled with 10 minutes of readings, in this process (tracemalloc
        and RSS), and the daemons' RSS with and without a page streaming. Target: <= 5 MB added.

Run: .venv/bin/python bench/bench_statuspage.py [--seconds 60] [--rounds 2]
(under `flock /tmp/gatewayd-bench.lock`; the machine may be shared: compare within a run)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
import urllib.request
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_idle import proc_cpu_s, rss_mb  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base(state: Path, port: int) -> str:
    return textwrap.dedent(f"""
        [gateway]
        id = "bench-page"
        state_dir = "{state}"
        [health]
        listen = "127.0.0.1:{port}"
        [log]
        level = "warning"
        format = "json"
        [uplinks.archive]
        type = "jsonl"
        path = "{state / 'out.jsonl'}"
        rotate_bytes = "64MiB"
        keep = 1
    """)


def bench_config(state: Path, port: int, emu: object) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = state / "gatewayd.toml"
    path.write_text(_base(state, port) + emu.toml(commands=True))  # type: ignore[attr-defined]
    return path


def big_config(state: Path, port: int, devices: int = 50, points: int = 20) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    pts = ", ".join(f'p{j}_v = {{ shape = "walk", seed = {j} }}' for j in range(points))
    devs = "".join(f'\n[[devices]]\nname = "dev{i}"\ndriver = "sim"\ninterval = "5s"\n'
                   f"points = {{ {pts} }}\n" for i in range(devices))
    path = state / "gatewayd.toml"
    path.write_text(_base(state, port) + devs)
    return path


def start(cfg: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a benchmark's start-up wait, bounded
        if proc.poll() is not None:
            raise SystemExit(f"gatewayd exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("gatewayd did not become healthy")


def page_client(port: int, out: Path) -> subprocess.Popen[bytes]:
    """A page streaming /events (its bytes are counted, to show it really streamed)."""
    return subprocess.Popen(["curl", "-sN", f"http://127.0.0.1:{port}/events", "-o", str(out)])


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def run_pair(kind: str, round_no: int, seconds: float, warmup: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmpd = Path(tmp)
        ports = [free_port(), free_port()]
        cfgs = []
        for i, port in enumerate(ports):
            if kind == "cpu":
                from gatewayd_sim.hw.bench import BenchEmulation

                emu = stack.enter_context(BenchEmulation(i2c_bus=f"bench{i}"))
                cfgs.append(bench_config(tmpd / f"d{i}", port, emu))
            else:
                cfgs.append(big_config(tmpd / f"d{i}", port))
        procs = [start(c, p) for c, p in zip(cfgs, ports, strict=True)]
        watched = round_no % 2  # which daemon has the page this round
        stream = tmpd / "events.txt"
        client = page_client(ports[watched], stream)
        try:
            time.sleep(warmup)  # warm-up: imports done, first readings, page connected
            c0 = [proc_cpu_s(p.pid) for p in procs]
            t0 = time.perf_counter()
            time.sleep(seconds)
            c1 = [proc_cpu_s(p.pid) for p in procs]
            wall = time.perf_counter() - t0
            rss = [rss_mb(p.pid) for p in procs]
        finally:
            stop(client, *procs)
        cpu = [(b - a) / wall * 100 for a, b in zip(c0, c1, strict=True)]
        return {"round": round_no, "with_page_cpu_pct": round(cpu[watched], 3),
                "without_page_cpu_pct": round(cpu[1 - watched], 3),
                "with_page_rss_mb": round(rss[watched], 2), "without_page_rss_mb": round(rss[1 - watched], 2),
                "streamed_kb": round(stream.stat().st_size / 1024, 1) if stream.exists() else 0.0}


def store_alone(devices: int = 50, points: int = 20) -> dict[str, float]:
    """The recent-values store filled with 10 minutes of readings at one per 5 s bucket."""
    from drivers.base import Reading
    from gatewayd.web.recent import BUCKET_S, SLOTS, Recent

    tracemalloc.start()
    recent = Recent()
    t0 = 1_800_000_000_000
    for k in range(SLOTS):
        ts = t0 + k * BUCKET_S * 1000
        recent.record([Reading(f"dev{i}", f"p{j}_v", float(k + j), ts)
                       for i in range(devices) for j in range(points)])
    held, _ = tracemalloc.get_traced_memory()
    snap = json.dumps(recent.snapshot(now_ms=t0 + SLOTS * BUCKET_S * 1000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"points": devices * points, "samples_per_point": SLOTS,
            "store_mb": round(held / 2**20, 2), "peak_with_snapshot_mb": round(peak / 2**20, 2),
            "snapshot_kb": round(len(snap) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    store = store_alone()
    print(json.dumps({"store": store}))
    summary = {}
    for kind in ("cpu", "rss"):
        rows = [run_pair(kind, r, args.seconds, args.warmup) for r in range(args.rounds)]
        for row in rows:
            print(json.dumps({kind: row}))
        n = len(rows)
        summary[kind] = (sum(r["with_page_cpu_pct"] - r["without_page_cpu_pct"] for r in rows) / n,
                         sum(r["with_page_rss_mb"] - r["without_page_rss_mb"] for r in rows) / n,
                         sum(r["without_page_cpu_pct"] for r in rows) / n)
    cpu_add, _, cpu_base = summary["cpu"]
    _, rss_add, _ = summary["rss"]
    print(f"# status page, {args.seconds:g} s x {args.rounds} rounds (shared machine): bench workload "
          f"{cpu_base:.2f} % of a core without the page, {cpu_add:+.3f} % with it streaming "
          f"(target <= 0.2); 50 x 20 points: recent-values store {store['store_mb']} MB "
          f"({store['peak_with_snapshot_mb']} MB peak with a snapshot), daemon RSS "
          f"{rss_add:+.2f} MB with a page streaming (target <= 5)")


if __name__ == "__main__":
    main()
