"""`make run`: the bench. gatewayd on bench/bench.toml with emulated devices and local sinks.

It starts the daemon in the foreground (its log on this terminal), sends a command to an
actuator through the local command hook, and prints a summary of what flows every few seconds.
Ctrl-C stops everything (the daemon gets SIGTERM and flushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = HERE / "bench.toml"
HEALTH = "http://127.0.0.1:9847"


async def wait_healthy(session: aiohttp.ClientSession, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(30):
        while proc.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{HEALTH}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)  # the daemon is starting; poll its health endpoint
    raise RuntimeError(f"gatewayd exited with {proc.returncode} before it was healthy")


async def command(session: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(f"{HEALTH}/commands", json=body) as resp:
        return await resp.json()  # type: ignore[no-any-return]


def archive_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return path.read_text().splitlines()


async def summary_loop(session: aiohttp.ClientSession) -> None:
    archive = HERE / "state" / "archive.jsonl"
    while True:
        await asyncio.sleep(5)
        async with session.get(f"{HEALTH}/status") as resp:
            status = await resp.json()
        lines = archive_lines(archive)
        last = json.loads(lines[-1]) if lines else {}
        devices = ", ".join(f"{n}={d['state']}" for n, d in status["devices"].items())
        uplinks = ", ".join(f"{n}={u['state']} sent={u['sent']} backlog={u['backlog'].get('rows', 0)}"
                            for n, u in status["uplinks"].items())
        print(f"[bench] queue rows={status['queue']['rows']} | devices: {devices} | uplinks: {uplinks}"
              f" | last reading: {last.get('device')}.{last.get('point')}={last.get('value')}",
              flush=True)


async def main() -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "run", "-c", str(CONFIG), env=env, cwd=ROOT)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_healthy(session, proc)
            print(f"""
[bench] gatewayd is up. Watch the readings flow:
    curl -s {HEALTH}/status | python3 -m json.tool     # devices, uplinks, backlog
    tail -f {HERE / 'state' / 'archive.jsonl'}          # delivered readings (jsonl uplink)
    curl -s {HEALTH}/metrics | grep gatewayd_           # Prometheus metrics
  Send a command yourself:
    curl -s -XPOST {HEALTH}/commands -d '{{"action":"set_relay","params":{{"channel":1,"on":false}}}}'
""", flush=True)
            result = await command(session, {"action": "set_relay", "params": {"channel": 3, "on": True}})
            print(f"[bench] command set_relay(channel=3, on=true) -> {result}", flush=True)
            summary = asyncio.create_task(summary_loop(session))
            waiter = asyncio.create_task(proc.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in (summary, waiter, stopper):
                t.cancel()
            await asyncio.gather(summary, waiter, stopper, return_exceptions=True)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    print(f"[bench] gatewayd exited with {proc.returncode}")
    return 0 if proc.returncode in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
