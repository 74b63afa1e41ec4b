"""Spine benchmarks: queue append, backlog drain, end to end sim -> queue -> jsonl, idle CPU.

Each case runs in its own process so peak RSS is that case's own. Prints one line per case:
readings/s, CPU-seconds per 1k readings, and peak RSS.

    python bench/bench_queue.py            # all cases
    python bench/bench_queue.py --case append --n 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.base import Reading  # noqa: E402
from gatewayd.queue import Queue, QueueConfig  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch(start: int, n: int, now_ms: int) -> list[Reading]:
    return [Reading(f"dev{(start + j) % 20}", "temperature_c", 20.0 + (start + j) % 1000 * 0.01,
                    now_ms + start + j) for j in range(n)]


async def case_append(n: int, state: Path) -> dict[str, float]:
    """(a) put() with group commit and fsync=always, 50 concurrent producers of 1000."""
    q = Queue(state / "q.db", QueueConfig(fsync="always", max_rows=n * 2), ["a"])
    await q.open()
    runner = asyncio.create_task(q.run())
    now = int(time.time() * 1000)
    t0, c0 = time.perf_counter(), time.process_time()
    futs = []
    for i in range(0, n, 1000):
        futs.append(q.submit(batch(i, 1000, now)))
        if len(futs) == 50:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await q.close()
    return {"readings": n, "wall_s": wall, "cpu_s": cpu}


async def case_drain(n: int, state: Path) -> dict[str, float]:
    """(b) lease + ack of an n-row backlog, 5000 per lease, each ack fsynced (the default)."""
    db = state / "q.db"
    q = Queue(db, QueueConfig(fsync="off", max_rows=n * 2), ["a"])
    await q.open()
    now = int(time.time() * 1000)
    for i in range(0, n, 50_000):
        await q._on_writer(q._commit_sync, batch(i, 50_000, now), 0, {})
        q.tail += 50_000
    await q.close()
    del q
    # Measure in a fresh process state: only the drain's memory counts.
    q = Queue(db, QueueConfig(max_rows=n * 2), ["a"])  # the default policy: fsync=always
    await q.open()
    ob = q.outbox("a")
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    while done < n:
        lease = await ob.lease(5000, wait_s=0)
        if not lease.items:
            break
        await ob.ack(lease.last_seq)
        done += len(lease)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await q.close()
    assert done == n, done
    return {"readings": done, "wall_s": wall, "cpu_s": cpu}


def write_config(state: Path, devices: int, interval: str, count: int, level: str = "warning",
                 fsync: str = "always") -> Path:
    devs = "".join(textwrap.dedent(f"""
        [[devices]]
        name = "dev{i}"
        driver = "sim"
        interval = "{interval}"
        count = {count}
        points.v = {{ shape = "sine", period = "30s" }}
    """) for i in range(devices))
    cfg = textwrap.dedent(f"""
        [gateway]
        id = "bench"
        state_dir = "{state}"
        [queue]
        fsync = "{fsync}"
        [health]
        enabled = false
        [log]
        level = "{level}"
        format = "json"
        [uplinks.archive]
        type = "jsonl"
        path = "{state / 'out.jsonl'}"
        batch = 5000
        rotate_bytes = "256MiB"
        keep = 1
    """) + devs
    path = state / "bench.toml"
    path.write_text(cfg)
    return path


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_daemon(cfg: Path, seconds: float, warmup: float) -> dict[str, float]:
    """Run `gatewayd run` as a process; measure its CPU and delivered readings after warm-up."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, env=env)
    out = cfg.parent / "out.jsonl"
    try:
        time.sleep(warmup)  # a benchmark's warm-up, not synchronization
        lines0 = count_lines(out)
        cpu0, t0 = proc_cpu_s(proc.pid), time.perf_counter()
        time.sleep(seconds)
        cpu1, t1 = proc_cpu_s(proc.pid), time.perf_counter()
        lines1 = count_lines(out)
        rss = proc_rss_peak_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"readings": lines1 - lines0, "wall_s": t1 - t0, "cpu_s": cpu1 - cpu0, "rss_mb": rss}


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))


def case_e2e(seconds: float, state: Path) -> dict[str, float]:
    """(c) sim -> queue -> jsonl at the highest rate the daemon sustains."""
    return run_daemon(write_config(state, 10, "10ms", 199), seconds, warmup=3)


def case_e2e_normal(seconds: float, state: Path) -> dict[str, float]:
    """(c') the same with fsync=normal: what power-cut safety costs at full load."""
    return run_daemon(write_config(state, 10, "10ms", 199, fsync="normal"), seconds, warmup=3)


def case_steady(seconds: float, state: Path, fsync: str) -> dict[str, float]:
    """A steady 1,000 readings/s (20 devices x 50 points at 1 Hz) with the given fsync policy."""
    return run_daemon(write_config(state, 20, "1s", 49, fsync=fsync), seconds, warmup=3)


def case_idle(seconds: float, state: Path) -> dict[str, float]:
    """Idle CPU: 20 devices at 1 Hz."""
    return run_daemon(write_config(state, 20, "1s", 0), seconds, warmup=3)


def run_case(name: str, n: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        if name == "append":
            res = asyncio.run(case_append(n, state))
        elif name == "drain":
            res = asyncio.run(case_drain(n, state))
        elif name == "e2e":
            res = case_e2e(seconds, state)
        elif name == "e2e_normal":
            res = case_e2e_normal(seconds, state)
        elif name in ("steady_always", "steady_normal"):
            res = case_steady(seconds, state, name.split("_")[1])
        else:
            res = case_idle(seconds, state)
    res.setdefault("rss_mb", peak_rss_mb())
    return res


def report(name: str, r: dict[str, float]) -> str:
    rate = r["readings"] / r["wall_s"] if r["wall_s"] else 0
    per_k = r["cpu_s"] / r["readings"] * 1000 if r["readings"] else float("nan")
    line = (f"{name:<28} {rate:>12,.0f} readings/s  {per_k:>8.4f} CPU-s/1k  "
            f"peak RSS {r['rss_mb']:6.1f} MB")
    if name.startswith("idle"):
        line += f"  idle CPU {r['cpu_s'] / r['wall_s'] * 100:.2f} % of a core"
    return line


CASES = {
    "append": "(a) append, group commit, fsync=always",
    "drain": "(b) drain 1M backlog (lease+ack)",
    "e2e": "(c) e2e sim->queue->jsonl",
    "e2e_normal": "(c') e2e, fsync=normal",
    "steady_always": "steady 1k/s, fsync=always",
    "steady_normal": "steady 1k/s, fsync=normal",
    "idle": "idle: 20 devices at 1 Hz",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", choices=list(CASES))
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=0)
    args = ap.parse_args()
    if args.case:
        seconds = args.seconds or (60 if args.case == "idle" else 10)
        print(json.dumps(run_case(args.case, args.n, seconds)))
        return
    print("gatewayd spine benchmarks (each case in its own process)")
    for name, title in CASES.items():
        cmd = [sys.executable, __file__, "--case", name, "--n", str(args.n)]
        if args.seconds:
            cmd += ["--seconds", str(args.seconds)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(report(title, json.loads(out.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
