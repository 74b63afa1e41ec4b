"""EnOS end to end: readings -> SQLite queue -> EnOS uplink -> EnOS hub simulator.

The simulator runs in its own process (as the real hub would be elsewhere); the queue,
uplink and dispatcher run here. Prints: live readings/s, CPU-seconds per 1k readings (gateway
and simulator), 1,000,000-reading backlog drained via resume.batch, command round trip
(simulator -> uplink -> dispatcher -> relay -> reply) p50/p99, peak RSS.

Run: /work/venv/bin/python bench/bench_enos.py [--live N] [--backlog N] [--commands N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from drivers.base import Reading  # noqa: E402
from drivers.logact import LogActuator, LogActuatorConfig  # noqa: E402
from gatewayd.config import CommandMap, DispatchSection, ParamSpec  # noqa: E402
from gatewayd.dispatch import Dispatcher  # noqa: E402
from gatewayd.queue import Queue, QueueConfig  # noqa: E402
from gatewayd.schema import Secret  # noqa: E402
from gatewayd.uplinks.base import UplinkContext, UplinkState  # noqa: E402
from gatewayd.uplinks.enos import DeviceMapping, EnosConfig, EnosUplink  # noqa: E402

SUBS = 20
POINTS = ("voltage", "current", "power", "temp", "freq")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry() -> dict[str, Any]:
    subs = [f"SUBPK/meter-{i:03d}" for i in range(SUBS)] + ["RELAYPK/relay-001"]
    return {
        "products": {"GWPK": {"secret": "gwps"}, "SUBPK": {"secret": "subps"},
                     "RELAYPK": {"secret": "rps", "model": {"on": "bool"}}},
        "devices": [{"product_key": "GWPK", "device_key": "gw-bench", "secret": "gwSecret",
                     "node_type": "gateway", "sub_devices": subs}]
        + [{"product_key": s.split("/")[0], "device_key": s.split("/")[1],
            "secret": f"secret-{s.split('/')[1]}", "node_type": "sub"} for s in subs]}


def cpu_of(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def readings(start: int, n: int, ts0: int) -> list[Reading]:
    out = []
    for i in range(start, start + n):
        dev = i % (SUBS + 1)
        name = f"meter{dev}" if dev < SUBS else "gwself"
        out.append(Reading(name, POINTS[i % len(POINTS)], float(i), ts0 + i // 100))
    return out


async def fill(queue: Queue, n: int, chunk: int = 20_000, window: int = 10) -> None:
    """Queue `n` readings as a fast sampler would: up to `window` chunks awaiting commit."""
    ts0 = int(time.time() * 1000) - n // 100
    pending: list[asyncio.Future[bool]] = []
    for i in range(0, n, chunk):
        pending.append(queue.submit(readings(i, min(chunk, n - i), ts0)))
        if len(pending) >= window:
            assert await pending.pop(0)
    assert all(await asyncio.gather(*pending))


async def wait_acked(queue: Queue, seq: int, timeout_s: float) -> None:
    ob = queue.outbox("enos")
    async with asyncio.timeout(timeout_s):
        while ob.acked < seq:
            await asyncio.sleep(0.005)  # a bench probe, not a test synchronisation


async def main(args: argparse.Namespace) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    tmp = Path(tempfile.mkdtemp(prefix="bench-enos-"))
    reg = tmp / "registry.json"
    reg.write_text(json.dumps(registry()))
    port, http_port = free_port(), free_port()
    with (tmp / "sim.log").open("wb") as sim_log:
        sim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd_sim.enos", "--registry", str(reg), "--port",
            str(port), "--http-port", str(http_port), "--no-throttle", "--no-record", cwd=ROOT,
            stdout=sim_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while b"enos sim:" not in (tmp / "sim.log").read_bytes():  # printed once it listens
        if sim.returncode is not None or time.monotonic() > deadline:
            raise SystemExit(f"the EnOS simulator did not start; see {tmp / 'sim.log'}")
        await asyncio.sleep(0.05)
    queue = Queue(tmp / "queue.db", QueueConfig(commit_window=0.05, fsync="normal"), ["enos"])
    await queue.open()
    relay = LogActuator("relay", LogActuatorConfig(), buses=None)  # type: ignore[arg-type]
    dispatcher = Dispatcher([CommandMap("switch", "relay", uplink="enos", device="relay",
                                        params={"on": ParamSpec("bool")})],
                            {"relay": relay}, DispatchSection())
    devices = {f"meter{i}": DeviceMapping("SUBPK", f"meter-{i:03d}",
                                          Secret(f"secret-meter-{i:03d}")) for i in range(SUBS)}
    devices["gwself"] = DeviceMapping(gateway=True)
    devices["relay"] = DeviceMapping("RELAYPK", "relay-001", Secret("secret-relay-001"))
    cfg = EnosConfig(host="127.0.0.1", port=port, product_key="GWPK", device_key="gw-bench",
                     device_secret=Secret("gwSecret"), max_message_bytes=512 * 1024,
                     batch_max_points=args.lease, max_inflight=8, devices=devices,
                     backoff_base=0.2)
    ctx = UplinkContext("bench", tmp, queue.outbox("enos"), dispatcher.submit)
    tasks = [asyncio.create_task(queue.run(), name="bench-queue"),
             asyncio.create_task(dispatcher.run(), name="bench-dispatch")]
    results: dict[str, Any] = {}
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with aiohttp.ClientSession() as http:
            # 1. Backlog: readings queued before the uplink ever connected go via resume.
            t0 = time.perf_counter()
            await fill(queue, args.backlog)
            results["backlog_fill_s"] = time.perf_counter() - t0
            uplink = EnosUplink("enos", cfg, ctx)
            dispatcher.repliers["enos"] = uplink.reply
            sim_cpu0, cpu0, t0 = cpu_of(sim.pid), self_cpu(), time.perf_counter()
            tasks.append(asyncio.create_task(uplink.run(), name="bench-uplink"))
            await wait_acked(queue, queue.tail, 600)
            dt = time.perf_counter() - t0
            results["backlog"] = (args.backlog, dt, self_cpu() - cpu0, cpu_of(sim.pid) - sim_cpu0)
            # 2. Live: readings produced while connected go via post.
            await uplink.wait_for_state(UplinkState.CONNECTED)
            target = queue.tail + args.live
            sim_cpu0, cpu0, t0 = cpu_of(sim.pid), self_cpu(), time.perf_counter()
            await fill(queue, args.live, chunk=5_000)
            await wait_acked(queue, target, 600)
            dt = time.perf_counter() - t0
            results["live"] = (args.live, dt, self_cpu() - cpu0, cpu_of(sim.pid) - sim_cpu0)
            async with http.get(f"{base}/stats") as resp:
                results["stats"] = (await resp.json())["counts"]
            # 3. Command round trip, measured by the simulator from push to reply.
            rtts = []
            for i in range(args.commands):
                async with http.post(f"{base}/commands", json={
                        "productKey": "RELAYPK", "deviceKey": "relay-001", "service": "switch",
                        "params": {"on": i % 2 == 0}, "wait_s": 5}) as resp:
                    body = await resp.json()
                assert body["reply"]["code"] == 200, body
                rtts.append(body["rtt_ms"])
            rtts.sort()
            results["rtt"] = (rtts[len(rtts) // 2], rtts[min(len(rtts) - 1,
                                                              int(len(rtts) * 0.99))], rtts[-1])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await queue.close()
        sim.terminate()
        await sim.wait()
    n, dt, cpu, scpu = results["backlog"]
    print(f"enos backlog: {n} readings queued offline in {results['backlog_fill_s']:.1f} s, "
          f"drained via resume.batch in {dt:.2f} s ({n / dt:,.0f} readings/s; target <= 30 s)")
    print(f"enos backlog CPU: gateway {cpu * 1000 / n:.4f} s/1k readings, "
          f"simulator {scpu * 1000 / n:.4f} s/1k")
    n, dt, cpu, scpu = results["live"]
    print(f"enos live: {n} readings in {dt:.2f} s = {n / dt:,.0f} readings/s "
          f"(queue put -> hub ack; target >= 50,000/s)")
    print(f"enos live CPU: gateway {cpu * 1000 / n:.4f} s/1k readings, "
          f"simulator {scpu * 1000 / n:.4f} s/1k")
    st = results["stats"]
    print(f"enos hub accepted: post {st.get('points_post', 0)}, resume {st.get('points_resume', 0)}"
          f", messages {st.get('messages', 0)}")
    p50, p99, worst = results["rtt"]
    print(f"enos command round trip ({args.commands}): p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
          f"max {worst:.2f} ms (target p99 <= 20 ms)")
    print(f"enos peak RSS (gateway process): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    ok = (results["backlog"][1] <= 30 and results["live"][0] / results["live"][1] >= 50_000
          and p99 <= 20 and st.get("points_resume", 0) == args.backlog)
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--live", type=int, default=500_000)
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--commands", type=int, default=300)
    p.add_argument("--lease", type=int, default=20_000)
    raise SystemExit(asyncio.run(main(p.parse_args())))
