"""Operations Hub bench: readings/s end to end with batching, and a 1,000,000-reading backlog drain.

The simulator runs in its own process (`gatewayd sim opshub`), as the real server would; the
gateway side is the real SQLite queue and the real `OpsHubUplink`. Prints readings/s, CPU-seconds
per 1k readings (gateway process), peak RSS, and the latency from sampling to stored row both
at full load and at a steady rate well below capacity.

    /work/venv/bin/python bench/bench_opshub.py [--live N] [--backlog N] [--batch N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.base import Reading, now_ms  # noqa: E402
from gatewayd.logs import setup as setup_logs  # noqa: E402
from gatewayd.queue import Queue, QueueConfig  # noqa: E402
from gatewayd.schema import Builder  # noqa: E402
from gatewayd.uplinks.base import UplinkContext  # noqa: E402
from gatewayd.uplinks.opshub import OpsHubConfig, OpsHubUplink  # noqa: E402

USER, PASSWORD = "BENCH", "bench-pw"
DEVICES, POINTS = 10, 5  # 50 series: every publish carries 10 channels
TARGET = 20_000  # readings/s the issue asks for


async def start_simulator() -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd_sim.opshub", "--port", "0", "--user",
        f"{USER}:{PASSWORD}", "--max-rows", "200000", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    async with asyncio.timeout(30):
        while True:
            line = await proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("simulator exited before listening")
            if line.startswith(b'{"opshub_sim"'):
                return proc, json.loads(line)["opshub_sim"]


def uplink_config(url: str, batch: int) -> OpsHubConfig:
    b = Builder(env={"BENCH_PW": PASSWORD})
    cfg = b.build(OpsHubConfig, {
        "url": url, "allow_http": True, "username": USER, "password_env": "BENCH_PW",
        "gateway_id": "01-23-45-67-89-ab", "poll_interval": "1s", "max_batch": batch,
        "backoff_base": "50ms", "backoff_cap": "1s"}, "bench")
    assert cfg is not None, b.errors
    return cfg  # type: ignore[no-any-return]


def make_readings(start: int, count: int, ts_ms: int) -> list[Reading]:
    """`count` readings round-robin over the series; a new sampling time every 50 readings."""
    series = DEVICES * POINTS
    return [Reading(f"dev{(i % series) // POINTS}", f"p{i % POINTS}", float(i % 1000) / 8,
                    ts_ms + (i - start) // series) for i in range(start, start + count)]


class Gateway:
    """The gateway side: queue plus uplink, with the uplink started and stopped on demand."""

    def __init__(self, state: Path, url: str, batch: int) -> None:
        self.queue = Queue(state / "queue.db", QueueConfig(commit_window=0.05), ["opshub"])
        self.config = uplink_config(url, batch)
        self.tasks: list[asyncio.Task[Any]] = []
        self.uplink: OpsHubUplink | None = None

    async def __aenter__(self) -> Gateway:
        await self.queue.open()
        self.tasks.append(asyncio.create_task(self.queue.run(), name="bench-queue"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in reversed(self.tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.queue.close()

    def start_uplink(self) -> None:
        outbox = self.queue.outbox("opshub")
        ctx = UplinkContext("bench", Path("."), outbox, lambda c: None)
        self.uplink = OpsHubUplink("opshub", self.config, ctx)
        self.tasks.append(asyncio.create_task(self.uplink.run(), name="bench-uplink"))

    async def drained(self, timeout_s: float) -> None:
        outbox = self.queue.outbox("opshub")
        async with asyncio.timeout(timeout_s):
            while outbox.acked < self.queue.tail:
                await asyncio.sleep(0.02)


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def sim_stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with asyncio.timeout(30), http.get(url + "/sim/stats") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def live_case(state: Path, url: str, http: aiohttp.ClientSession, total: int,
                    batch: int) -> dict[str, Any]:
    """Producer queues as fast as the queue commits; the uplink publishes while it does."""
    before = (await sim_stats(http, url))["rows_total"]
    async with Gateway(state / "live", url, batch) as gw:
        gw.start_uplink()
        cpu0, t0 = cpu_s(), time.perf_counter()
        chunk = 5000
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            # sampling times end "now": latency counts from when each reading was sampled
            await gw.queue.put(make_readings(start, n, now_ms() - n // (DEVICES * POINTS)))
        queued_s = time.perf_counter() - t0
        await gw.drained(300)
        elapsed = time.perf_counter() - t0
        cpu = cpu_s() - cpu0
        messages = gw.uplink.publishes if gw.uplink else 0
    stored = (await sim_stats(http, url))["rows_total"] - before
    lat = await stored_latency(http, url, before)
    return {"readings": total, "stored": stored, "seconds": round(elapsed, 2),
            "readings_per_s": round(total / elapsed), "queue_put_s": round(queued_s, 2),
            "publishes": messages, "cpu_s_per_1k": round(cpu / total * 1000, 4), **lat}


async def stored_latency(http: aiohttp.ClientSession, url: str, after: int) -> dict[str, Any]:
    """p50/p99 of (stored at server - sampled) over a sample of the stored rows."""
    async with asyncio.timeout(60), http.get(url + f"/sim/data?after={after}&limit=20000") as r:
        rows = (await r.json())["rows"]
    lat = []
    for row in rows:
        ts = row["timestamp"]  # "YYYY-MM-DDThh:mm:ss.sss+00:00"
        lat.append(row["received_ms"] - int(datetime.fromisoformat(ts).timestamp() * 1000))
    if not lat:
        return {}
    lat.sort()
    return {"latency_ms_p50": lat[len(lat) // 2], "latency_ms_p99": lat[int(len(lat) * 0.99)],
            "latency_ms_mean": round(statistics.fmean(lat), 1)}


async def paced_case(state: Path, url: str, http: aiohttp.ClientSession, rate: int,
                     seconds: float, batch: int) -> dict[str, Any]:
    """Latency under a steady sampling rate well below capacity (what a field gateway sees)."""
    before = (await sim_stats(http, url))["rows_total"]
    tick_s, per_tick = 0.02, max(1, int(rate * 0.02))
    async with Gateway(state / "paced", url, batch) as gw:
        gw.start_uplink()
        sent, t0, commits = 0, time.perf_counter(), []
        while time.perf_counter() - t0 < seconds:
            # submit() joins the open commit window without waiting for it, as a sampler does
            commits.append(gw.queue.submit(make_readings(sent, per_tick, now_ms())))
            sent += per_tick
            await asyncio.sleep(tick_s)  # pacing the producer, not synchronisation
        assert all(await asyncio.gather(*commits))
        await gw.drained(60)
    return {"rate": rate, "readings": sent, **await stored_latency(http, url, before)}


async def backlog_case(state: Path, url: str, http: aiohttp.ClientSession, total: int,
                       batch: int) -> dict[str, Any]:
    """Queue `total` readings with the uplink down, then time the drain."""
    before = (await sim_stats(http, url))["rows_total"]
    async with Gateway(state / "backlog", url, batch) as gw:
        t0 = time.perf_counter()
        chunk = 20_000
        ts = now_ms() - 3_600_000
        for start in range(0, total, chunk):
            await gw.queue.put(make_readings(start, min(chunk, total - start), ts))
        fill_s = time.perf_counter() - t0
        cpu0, t1 = cpu_s(), time.perf_counter()
        gw.start_uplink()
        await gw.drained(600)
        elapsed = time.perf_counter() - t1
        cpu = cpu_s() - cpu0
        messages = gw.uplink.publishes if gw.uplink else 0
    stored = (await sim_stats(http, url))["rows_total"] - before
    return {"readings": total, "stored": stored, "fill_seconds": round(fill_s, 2),
            "drain_seconds": round(elapsed, 2), "readings_per_s": round(total / elapsed),
            "publishes": messages, "cpu_s_per_1k": round(cpu / total * 1000, 4)}


async def main(args: argparse.Namespace) -> int:
    setup_logs("warning", "console")
    proc, url = await start_simulator()
    try:
        async with aiohttp.ClientSession() as http:
            with tempfile.TemporaryDirectory(prefix="bench-opshub-") as tmp:
                state = Path(tmp)
                live = await live_case(state, url, http, args.live, args.batch)
                print(f"opshub live:    {live['readings']:>9,} readings in {live['seconds']:6.2f} s "
                      f"= {live['readings_per_s']:>7,} readings/s  ({live['publishes']} publishes, "
                      f"{live['cpu_s_per_1k']} CPU-s/1k, latency p50 {live.get('latency_ms_p50')} "
                      f"ms p99 {live.get('latency_ms_p99')} ms)", flush=True)
                paced = await paced_case(state, url, http, args.rate, 4.0, args.batch)
                print(f"opshub paced:   {paced['readings']:>9,} readings at ~{args.rate:,}/s: "
                      f"latency sampled->stored p50 {paced.get('latency_ms_p50')} ms, "
                      f"p99 {paced.get('latency_ms_p99')} ms", flush=True)
                backlog = await backlog_case(state, url, http, args.backlog, args.batch)
                print(f"opshub backlog: {backlog['readings']:>9,} readings drained in "
                      f"{backlog['drain_seconds']:6.2f} s = {backlog['readings_per_s']:>7,} "
                      f"readings/s  (queued in {backlog['fill_seconds']} s, "
                      f"{backlog['publishes']} publishes, {backlog['cpu_s_per_1k']} CPU-s/1k)",
                      flush=True)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ok = (live["stored"] >= live["readings"] and backlog["stored"] >= backlog["readings"]
              and min(live["readings_per_s"], backlog["readings_per_s"]) >= TARGET)
        print(f"opshub peak RSS (gateway side): {peak_mib:.0f} MiB; target >= {TARGET:,} "
              f"readings/s: {'met' if ok else 'NOT met'}")
        print(json.dumps({"bench": "opshub", "batch": args.batch, "live": live,
                          "paced": paced, "backlog": backlog, "peak_rss_mib": round(peak_mib),
                          "target_met": ok}))
        return 0 if ok else 1
    finally:
        proc.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await proc.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--live", type=int, default=200_000, help="readings in the live case")
    p.add_argument("--backlog", type=int, default=1_000_000, help="readings in the backlog case")
    p.add_argument("--rate", type=int, default=5000, help="readings/s in the paced case")
    p.add_argument("--batch", type=int, default=2000, help="readings per publish (max_batch)")
    raise SystemExit(asyncio.run(main(p.parse_args())))
