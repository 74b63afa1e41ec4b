"""MMS benchmark: readings/s end to end (queue -> MmsUplink -> simulator) over WebSocket and HTTP,
and the drain of a 1,000,000-reading backlog.

The simulator runs in its own process (`gatewayd sim mms`), so the gateway side and the server
side each get a core, as on a real deployment where the cloud is elsewhere. Figures printed:
readings/s, gateway CPU-seconds per 1k readings, simulator CPU-seconds per 1k readings, peak RSS
of the gateway process, and enqueue-to-stored latency percentiles of the live phase.

Usage: /work/venv/bin/python bench/bench_mms.py [--live N] [--backlog N] [--batch N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.base import Reading  # noqa: E402
from gatewayd.queue import Queue, QueueConfig  # noqa: E402
from gatewayd.schema import Secret  # noqa: E402
from gatewayd.uplinks.base import UplinkContext  # noqa: E402
from gatewayd.uplinks.mms import MessageMap, MmsConfig, MmsUplink  # noqa: E402
from gatewayd_sim.mms import DEFAULT_DEVICE_ID, DEFAULT_TOKEN, RESULT_TYPE  # noqa: E402

TYPE = "m0t0y0p0e1"
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class SimProcess:
    """`gatewayd sim mms` in a subprocess on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> SimProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd", "sim", "mms", "--port", str(self.port),
            "--max-rows", "2000",
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(15):
                while True:
                    try:
                        async with http.get(f"{self.url}/sim/tables") as r:
                            if r.status == 200:
                                return self
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        async with asyncio.timeout(10):
            await self.proc.wait()

    async def rows(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(10):
                async with http.get(f"{self.url}/sim/rows/{TYPE}?limit=2000") as r:
                    return await r.json()  # type: ignore[no-any-return]


def make_readings(n: int, start: int, ts_ms: int) -> list[Reading]:
    return [Reading(f"dev{i % 8}", "temp_c", 20.0 + (i % 100) / 10, ts_ms)
            for i in range(start, start + n)]


async def wait_acked(queue: Queue, seq: int, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while queue.outbox("mms").acked < seq:  # the cursor has no event to wait on
            await asyncio.sleep(0.01)


async def run_case(transport: str, live: int, backlog: int, batch: int, tmp: Path) -> dict[str, Any]:
    """One transport: a live phase (producer and uplink together), then a backlog drain."""
    out: dict[str, Any] = {"transport": transport}
    async with SimProcess() as sim:
        queue = Queue(tmp / f"{transport}.db", QueueConfig(commit_window=0.02), uplinks=["mms"])
        await queue.open()
        cfg = MmsConfig(device_id=DEFAULT_DEVICE_ID, token=Secret(DEFAULT_TOKEN), host=sim.url,
                        transport=transport, batch_size=batch, result_message_type=RESULT_TYPE,
                        poll_interval=5.0, messages=[MessageMap(TYPE, timestamp_format="ms")])
        ctx = UplinkContext("bench", tmp, queue.outbox("mms"), lambda _cmd: None)
        uplink = MmsUplink("mms", cfg, ctx)
        qtask = asyncio.create_task(queue.run(), name="bench-queue")
        utask = asyncio.create_task(uplink.run(), name=f"bench-mms-{transport}")
        try:
            # Live: readings enter the queue as fast as the producer can and leave as they come.
            pid = sim.proc.pid  # type: ignore[union-attr]
            t0, c0, s0 = time.perf_counter(), self_cpu_s(), proc_cpu_s(pid)
            futs = []
            for start in range(0, live, 2000):
                n = min(2000, live - start)
                futs.append(queue.submit(make_readings(n, start, time.time_ns() // 1_000_000)))
                await asyncio.sleep(0)  # let the uplink run between chunks
            assert all(await asyncio.gather(*futs))
            await wait_acked(queue, live, 120)
            dt = time.perf_counter() - t0
            out["live_readings_per_s"] = live / dt
            out["gw_cpu_s_per_1k"] = (self_cpu_s() - c0) / live * 1000
            out["sim_cpu_s_per_1k"] = (proc_cpu_s(pid) - s0) / live * 1000

            # Paced: 1,000 readings/s in 50-reading chunks, to measure latency without a queue.
            paced = 0
            for _ in range(40):
                futs = [queue.submit(make_readings(50, paced, time.time_ns() // 1_000_000))]
                paced += 50
                await asyncio.sleep(0.05)
            assert all(await asyncio.gather(*futs))
            await wait_acked(queue, live + paced, 30)
            rows = (await sim.rows())["rows"][-paced:]
            lat = sorted(r["G_CREATED"] - r["C_TIMESTAMP"] for r in rows)
            out["latency_ms_p50"] = statistics.median(lat)
            out["latency_ms_p99"] = lat[max(0, int(len(lat) * 0.99) - 1)]
            live += paced

            if backlog:
                # Backlog: the uplink is away while `backlog` readings pile up, then drains them.
                utask.cancel()
                await asyncio.gather(utask, return_exceptions=True)
                t_fill = time.perf_counter()
                ts_ms = time.time_ns() // 1_000_000  # recent, so the queue's age cap keeps them
                for start in range(0, backlog, 20_000):  # one chunk at a time, as a sampler would
                    assert await queue.put(make_readings(min(20_000, backlog - start), start, ts_ms))
                out["backlog_fill_s"] = time.perf_counter() - t_fill
                uplink = MmsUplink("mms", cfg, ctx)
                t0, c0 = time.perf_counter(), self_cpu_s()
                s0 = proc_cpu_s(pid)
                utask = asyncio.create_task(uplink.run(), name=f"bench-mms-{transport}-drain")
                await wait_acked(queue, live + backlog, 120)
                dt = time.perf_counter() - t0
                out["backlog_readings_per_s"] = backlog / dt
                out["backlog_drain_s"] = dt
                out["backlog_gw_cpu_s_per_1k"] = (self_cpu_s() - c0) / backlog * 1000
                out["backlog_sim_cpu_s_per_1k"] = (proc_cpu_s(pid) - s0) / backlog * 1000
            stored = (await sim.rows())["count"]
            out["stored_rows"] = stored
            out["duplicates"] = stored - live - backlog
        finally:
            utask.cancel()
            qtask.cancel()
            await asyncio.gather(utask, qtask, return_exceptions=True)
            await queue.close()
    return out


async def main(args: argparse.Namespace) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mms-") as tmp:
        for transport in args.transports:
            backlog = args.backlog if transport in args.backlog_transports else 0
            results.append(await run_case(transport, args.live, backlog, args.batch, Path(tmp)))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    targets = {"ws": 30_000, "http": 20_000}
    print(f"MMS bench (batch {args.batch}, live {args.live:,}, backlog {args.backlog:,})")
    for r in results:
        t = r["transport"]
        ok = "OK" if r["live_readings_per_s"] >= targets[t] else "BELOW TARGET"
        print(f"  {t:4s} live:    {r['live_readings_per_s']:>9,.0f} readings/s "
              f"(target {targets[t]:,}: {ok}); gateway {r['gw_cpu_s_per_1k']:.4f} CPU-s/1k, "
              f"simulator {r['sim_cpu_s_per_1k']:.4f} CPU-s/1k; "
              f"paced 1k/s enqueue->stored p50 {r['latency_ms_p50']:.0f} ms, "
              f"p99 {r['latency_ms_p99']:.0f} ms")
        if "backlog_readings_per_s" in r:
            print(f"  {t:4s} backlog: {r['backlog_readings_per_s']:>9,.0f} readings/s; "
                  f"{args.backlog:,} drained in {r['backlog_drain_s']:.1f} s "
                  f"(filled in {r['backlog_fill_s']:.1f} s); "
                  f"gateway {r['backlog_gw_cpu_s_per_1k']:.4f} CPU-s/1k, "
                  f"simulator {r['backlog_sim_cpu_s_per_1k']:.4f} CPU-s/1k")
        print(f"  {t:4s} stored {r['stored_rows']:,} rows, duplicates {r['duplicates']}")
    print(f"  gateway peak RSS: {peak_mb:.0f} MiB")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--live", type=int, default=300_000, help="readings in the live phase")
    p.add_argument("--backlog", type=int, default=1_000_000, help="backlog size to drain")
    p.add_argument("--batch", type=int, default=2000, help="readings per lease")
    p.add_argument("--transports", nargs="+", default=["ws", "http"], choices=["ws", "http"])
    p.add_argument("--backlog-transports", nargs="*", default=["ws", "http"],
                   choices=["ws", "http"], help="which transports also drain the backlog")
    sys.exit(asyncio.run(main(p.parse_args())))
