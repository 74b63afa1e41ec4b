"""`make run`: the bench. gatewayd with emulated devices and local cloud simulators.

The cloud simulators run in this process; gatewayd runs as a child process on bench/bench.toml,
its log on this terminal. Once it is healthy, each cloud sends a command that switches an
actuator, and a summary of what arrived where is printed every few seconds.
Ctrl-C stops everything (gatewayd gets SIGTERM and flushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BASE_CONFIG = HERE / "bench.toml"
STATE = HERE / "state"
CONFIG = STATE / "bench.generated.toml"
HEALTH = "http://127.0.0.1:9847"
OPSHUB_PORT = 8790
OPSHUB_USER, OPSHUB_PASSWORD = "BENCH", "bench-pw"
OPSHUB_GATEWAY = "01-23-45-67-89-ab"
ENOS_PORT, ENOS_HTTP = 11883, 18080
ENOS_GW = ("BENCHGW", "bench-gw")
ENOS_SECRETS = {"ENOS_GW_SECRET": "bench-gw-secret", "ENOS_METER1_SECRET": "bench-meter1-secret",
                "ENOS_METER2_SECRET": "bench-meter2-secret"}
MMS_PORT = 8443
MMS_DEVICE, MMS_TOKEN = "bench-gw", "bench-token-0123456789abcdef"


@dataclass
class Part:
    """One cloud (or device emulation) on the bench."""

    name: str
    env: dict[str, str] = field(default_factory=dict)  # for the daemon
    demo: Callable[[], Awaitable[str]] | None = None  # send a command, say what happened
    summary: Callable[[], str] | None = None  # one line: what arrived (every few seconds)
    stop: Callable[[], Awaitable[None]] | None = None
    banner: str = ""  # what does not change: printed once, at start


def stamp() -> str:
    """Now, in the style of gatewayd's own log lines (structlog ISO, UTC): one style per terminal."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z")


def say(text: str) -> None:
    for line in text.splitlines() or [""]:
        print(f"{stamp()} [bench] {line}" if line.strip() else "", flush=True)


def fmt(value: object) -> str:
    """A reading for a person: floats to 2 decimals (1800.4591064453125 -> 1800.46)."""
    if isinstance(value, float):
        text = f"{value:.2f}".rstrip("0").rstrip(".")
        return text if text not in ("-0", "") else "0"
    return str(value)


def summary_lines(status: dict[str, Any], archive_lines: list[str], parts: list[Part]) -> list[str]:
    """The periodic summary: queue, devices, uplinks, latest readings, each cloud."""
    devices = ", ".join(f"{n}={d['state']}" for n, d in status["devices"].items())
    uplinks = ", ".join(f"{n}={u['state']}/sent={u['sent']}/backlog={u['backlog'].get('rows', 0)}"
                        for n, u in status["uplinks"].items())
    latest: dict[str, Any] = {}
    for line in archive_lines:
        r = json.loads(line)
        latest[f"{r['device']}.{r['point']}"] = r["value"]
    shown = " ".join(f"{k}={fmt(v)}" for k, v in sorted(latest.items()))
    out = [f"queue rows={status['queue']['rows']} | devices: {devices}",
           f"uplinks: {uplinks}",
           f"latest readings (archive): {shown}"]
    return out + [p.summary() for p in parts if p.summary is not None]


def start_hardware() -> Part:
    """Serial devices on pseudo-terminals; the I2C chips live in the daemon (bus "sim:bench")."""
    from gatewayd_sim.hw.bench import BenchEmulation

    emu = BenchEmulation().start()
    STATE.mkdir(exist_ok=True)
    CONFIG.write_text(BASE_CONFIG.read_text() + emu.toml(commands=True))

    async def stop() -> None:
        emu.stop()

    banner = "emulated serial devices: " + ", ".join(f"{k}={v}" for k, v in emu.paths.items())
    return Part("hardware", stop=stop, banner=banner)


async def start_opshub() -> Part:
    from gatewayd_sim.opshub import OpsHubSimulator

    sim = OpsHubSimulator({OPSHUB_USER: OPSHUB_PASSWORD}, port=OPSHUB_PORT)
    await sim.start()
    dc = f"{OPSHUB_USER}/{OPSHUB_GATEWAY}"

    async def demo() -> str:
        sim.queue_command(dc, "relay2=on")
        await sim.wait_for(lambda: bool(sim.rows(metric="cmd_result")), timeout_s=20)
        r = sim.rows(metric="cmd_result")[-1]
        return f"queued 'relay2=on' for {dc} -> cmd_result {r['data']} ({r['description']})"

    def summary() -> str:
        rows = [r for r in sim.rows() if r["metric"] != "cmd_result"]
        last = rows[-1] if rows else {}
        return (f"opshub: {len(rows)} M2M_data rows, last {last.get('metric')}={fmt(last.get('data'))}"
                f" (GET {sim.url}/sim/data)")

    return Part("opshub", {"OPSHUB_PASSWORD": OPSHUB_PASSWORD}, demo, summary, sim.stop)


async def start_enos() -> Part:
    from gatewayd_sim.enos import Device, EnosSimulator, Product, Registry

    reg = Registry()
    reg.add_product(Product("BENCHGW", "bench-gw-product-secret"))
    reg.add_product(Product("BENCHMETER", "bench-meter-product-secret"))
    meters = {("BENCHMETER", "meter-1"): ENOS_SECRETS["ENOS_METER1_SECRET"],
              ("BENCHMETER", "meter-2"): ENOS_SECRETS["ENOS_METER2_SECRET"]}
    reg.add_device(Device(*ENOS_GW, ENOS_SECRETS["ENOS_GW_SECRET"], "gateway", sub_devices=set(meters)))
    for key, secret in meters.items():
        reg.add_device(Device(*key, secret, "sub"))
    sim = EnosSimulator(reg, port=ENOS_PORT, http_port=ENOS_HTTP)
    await sim.start()

    async def demo() -> str:
        await sim.wait_until(lambda: sim.online(ENOS_GW), timeout_s=20)
        reply = await sim.wait_reply(
            sim.invoke_service(ENOS_GW, "set_relay", {"channel": 2, "on": True}), timeout_s=20)
        return f"service thing.service.set_relay(channel=2, on=true) -> {reply}"

    def summary() -> str:
        c = sim.hub.counts
        shown = ", ".join(f"{p.device_key}.{p.point}={fmt(p.value)}" for p in sim.points()[-3:])
        return (f"enos: {c['points_post']} points via post, {c['points_resume']} via resume; "
                f"sub-devices logged in: {sorted(dk for _, dk in sim.logged_in(ENOS_GW))}; last: {shown}"
                f" (GET http://127.0.0.1:{ENOS_HTTP}/points?limit=5)")

    return Part("enos", dict(ENOS_SECRETS), demo, summary, sim.stop)


async def start_mms() -> Part:
    from gatewayd_sim.mms import DEFAULT_FROM_TYPE, DEFAULT_TO_TYPE, RESULT_TYPE, MmsSimulator

    sim = MmsSimulator(port=MMS_PORT, max_rows=10_000)
    sim.add_device(MMS_DEVICE, MMS_TOKEN)
    await sim.start()

    async def demo() -> str:
        await sim.wait_for(lambda: sim.count(DEFAULT_FROM_TYPE) > 0, timeout_s=20)  # ws is up
        await sim.push(MMS_DEVICE, {"method": "ws", "sender": "bench", "messageType": DEFAULT_TO_TYPE,
                                    "messages": [{"opcode": "relay_on", "operand": "5"}]})
        await sim.wait_for(lambda: sim.count(RESULT_TYPE) > 0, timeout_s=20)
        r = sim.rows(RESULT_TYPE)[-1]
        return (f"pushed relay_on(operand=5) over ws -> result ok={r.get('C_OK')} code={r.get('C_CODE')}"
                f" {r.get('C_MESSAGE')!r}")

    def summary() -> str:
        rows = sim.rows(DEFAULT_FROM_TYPE)
        last = rows[-1] if rows else {}
        return (f"mms: {len(rows)} rows of {DEFAULT_FROM_TYPE}, last {last.get('C_SENSOR')}="
                f"{fmt(last.get('C_VALUE'))} (GET {sim.url}/sim/rows/{DEFAULT_FROM_TYPE})")

    return Part("mms", {"MMS_TOKEN": MMS_TOKEN}, demo, summary, sim.stop)


async def wait_healthy(session: aiohttp.ClientSession, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(30):
        while proc.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{HEALTH}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)  # the daemon is starting; poll its health endpoint
    raise RuntimeError(f"gatewayd exited with {proc.returncode} before it was healthy")


async def local_demo(session: aiohttp.ClientSession) -> str:
    body = {"action": "set_relay", "params": {"channel": 3, "on": True}}
    async with session.post(f"{HEALTH}/commands", json=body) as resp:
        return f"POST /commands set_relay(channel=3, on=true) -> {await resp.json()}"


async def summary_loop(session: aiohttp.ClientSession, parts: list[Part]) -> None:
    archive = STATE / "archive.jsonl"
    while True:
        await asyncio.sleep(5)
        async with session.get(f"{HEALTH}/status") as resp:
            status = await resp.json()
        lines = archive.read_text().splitlines()[-200:] if archive.exists() else []
        say("\n".join(summary_lines(status, lines, parts)))


async def main() -> int:
    from gatewayd import logs

    logs.setup("info", "auto")  # the simulators log in the daemon's style, on this terminal
    parts = [start_hardware(), await start_enos(), await start_opshub(), await start_mms()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for p in parts:
        env.update(p.env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "run", "-c", str(CONFIG), env=env, cwd=ROOT)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_healthy(session, proc)
            for p in parts:
                if p.banner:
                    say(p.banner)
            say(f"""gatewayd is up. Status page: {HEALTH}/   Watch the readings flow:
    curl -s {HEALTH}/status | python3 -m json.tool     # devices, uplinks, backlog
    tail -f {STATE / 'archive.jsonl'}          # delivered readings (jsonl uplink)
    curl -s {HEALTH}/metrics | grep gatewayd_           # Prometheus metrics
    curl -s 'http://127.0.0.1:{ENOS_HTTP}/points?limit=5'       # what the EnOS hub accepted
    curl -s 'http://127.0.0.1:{OPSHUB_PORT}/sim/data?limit=5'   # what Operations Hub stored
    curl -s http://127.0.0.1:{MMS_PORT}/sim/rows/m0t0y0p0e1          # what HCP IoT MMS stored""")
            say(f"local: {await local_demo(session)}")
            for p in parts:
                if p.demo is not None:
                    try:
                        say(f"{p.name}: {await p.demo()}")
                    except TimeoutError:
                        say(f"{p.name}: no command result within the time limit")
            summary = asyncio.create_task(summary_loop(session, parts))
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
        for p in parts:
            if p.stop is not None:
                await p.stop()
    say(f"gatewayd exited with {proc.returncode}; config was {CONFIG}")
    return 0 if proc.returncode in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
