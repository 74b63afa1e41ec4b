"""The bench emulation: its config snippet is valid, and the daemon reads every emulated device
from it and drives both relay actuators."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from drivers.base import Command, CommandResult
from gatewayd.config import load
from gatewayd.dispatch import local_command
from gatewayd.service import Gateway
from gatewayd_sim.hw.bench import BenchEmulation
from gatewayd_sim.hw.i2c import drop_sim_bus, sim_bus
from tests.drivers.conftest import wait_for

BASE = """
[gateway]
id = "bench-test"
state_dir = "state"

[health]
enabled = false

[queue]
commit_window = "20ms"

[uplinks.archive]
type = "jsonl"
path = "archive.jsonl"
"""


@pytest.mark.timeout(60)
async def test_bench_config_runs_all_emulated_devices(tmp_path: Path) -> None:
    with BenchEmulation(i2c_bus="bench-test") as emu:
        path = tmp_path / "gatewayd.toml"
        path.write_text(BASE + emu.toml())
        cfg = load(path)
        assert {d.driver for d in cfg.devices} == {"bme280", "sht", "ads1115", "modbus", "nmea"}
        gw = Gateway(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop), name="gateway")
        try:
            async with asyncio.timeout(20):
                await gw.ready.wait()
            results: asyncio.Queue[CommandResult] = asyncio.Queue()

            async def reply(cmd: Command, result: CommandResult) -> None:
                await results.put(result)

            gw.dispatcher.repliers["local"] = reply
            gw.dispatcher.submit(local_command("set_relay", "", {"channel": 1, "on": True}, "b-1"))
            gw.dispatcher.submit(local_command("set_box_relay", "", {"channel": 4, "on": True}, "b-2"))
            async with asyncio.timeout(5):
                got = [await results.get(), await results.get()]
            assert all(r.ok for r in got), got
            assert sim_bus("bench-test").chip(0x20).latch == 0b1111_1101  # type: ignore[attr-defined]
            assert emu.relay_box.relays == {4: True}

            archive = tmp_path / "state" / "archive.jsonl"
            wanted = {("attic-env", "pressure_hpa"), ("room-climate", "temperature_c"),
                      ("tank", "level_m"), ("meter-1", "power_w"), ("meter-2", "voltage_v"),
                      ("gps", "alt")}

            async def all_seen() -> bool:
                if not archive.exists():
                    return False
                seen = {(r["device"], r["point"]) for r in map(json.loads, archive.read_text().splitlines())}
                return wanted <= seen

            await wait_for(all_seen, timeout_s=15)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            drop_sim_bus("bench-test")
            await asyncio.get_running_loop().shutdown_default_executor()
