"""End to end: fault isolation under the real sampler, and the whole daemon from a TOML config
running every driver against the emulations, with a command reaching the emulated relay."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from drivers.base import Command, CommandResult, Reading
from drivers.bme280 import BME280, BME280Config
from drivers.bus import BusManager
from drivers.nmea import NMEAConfig, NMEADriver
from drivers.sht import SHT, SHTConfig
from gatewayd.config import load
from gatewayd.dispatch import local_command
from gatewayd.sampler import Sampler
from gatewayd.service import Gateway
from gatewayd_sim.hw.chips import PCF8574Chip, SHTChip
from gatewayd_sim.hw.i2c import drop_sim_bus, sim_bus
from gatewayd_sim.hw.serial import ModbusSlaveSim, NMEASim
from tests.drivers.conftest import wait_for


class Sink:
    """The sampler's queue side: counts readings per device (the observation point)."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()

    def submit(self, readings: list[Reading]) -> None:
        self.reads[readings[0].device] += 1

    def backpressure(self) -> bool:
        return False  # an in-memory counter is never behind


async def test_failing_devices_do_not_slow_the_others_and_recover(buses: BusManager) -> None:
    bus_a, bus_b = f"iso-a-{uuid.uuid4().hex[:6]}", f"iso-b-{uuid.uuid4().hex[:6]}"
    sim_bus(bus_a).attach(0x44, SHTChip())
    nacker = sim_bus(bus_a).attach(0x45, SHTChip())
    sink = Sink()
    with NMEASim(rate_hz=20) as gps:
        drivers = [
            SHT("same-bus", SHTConfig(bus=f"sim:{bus_a}", address=0x44), buses),
            SHT("nacker", SHTConfig(bus=f"sim:{bus_a}", address=0x45), buses),
            BME280("other-bus", BME280Config(bus=f"sim:{bus_b}"), buses),
            NMEADriver("gps", NMEAConfig(port=gps.path, fix_timeout=0.5), buses),  # type: ignore[attr-defined]
        ]
        samplers = {d.name: Sampler(d, 0.1, 1.0, 0.0, 0.2, sink) for d in drivers}
        tasks = [asyncio.create_task(s.run(), name=f"sampler[{n}]") for n, s in samplers.items()]
        try:
            await wait_for(lambda: _true(all(sink.reads[n] >= 2 for n in samplers)))
            nacker.nack = True
            gps.unplug()  # type: ignore[attr-defined]
            before = dict(sink.reads)
            t0 = time.monotonic()
            await wait_for(lambda: _true(sink.reads["same-bus"] - before["same-bus"] >= 15))
            window = time.monotonic() - t0
            for name in ("same-bus", "other-bus"):
                rate = (sink.reads[name] - before[name]) / window
                assert rate >= 7.0, f"{name} slowed to {rate:.1f}/s while others failed"
            assert sink.reads["nacker"] - before["nacker"] <= 1
            assert samplers["nacker"].status.state == "failing"
            assert samplers["gps"].status.state == "failing"
            nacker.nack = False
            gps.replug()  # type: ignore[attr-defined]
            mark = dict(sink.reads)
            await wait_for(lambda: _true(sink.reads["nacker"] > mark["nacker"]
                                         and sink.reads["gps"] > mark["gps"]), timeout_s=10)
            assert samplers["nacker"].status.state == "ok"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await buses.close()
            drop_sim_bus(bus_a)
            drop_sim_bus(bus_b)


async def _true(value: bool) -> bool:
    return value


CONFIG = """
[gateway]
id = "e2e"
state_dir = "state"

[health]
enabled = false

[queue]
commit_window = "20ms"

[[devices]]
name = "env"
driver = "bme280"
interval = "200ms"
bus = "sim:{bus}"
address = 0x76

[[devices]]
name = "room"
driver = "sht"
interval = "200ms"
bus = "sim:{bus}"

[[devices]]
name = "tank"
driver = "ads1115"
interval = "200ms"
bus = "sim:{bus}"
points.level_m = {{ channel = "0", gain_v = 4.096, in_min = 0.0, in_max = 4.0, out_min = 0.0, out_max = 2.0 }}

[[devices]]
name = "meter"
driver = "modbus"
interval = "200ms"
port = "{modbus}"
baudrate = 19200
unit = 1
points.power_w = {{ address = 0, type = "float32" }}
points.energy_wh = {{ address = 2, type = "uint32", scale = 0.1 }}

[[devices]]
name = "gps"
driver = "nmea"
interval = "200ms"
port = "{gps}"

[[actuators]]
name = "relays"
driver = "pcf8574"
bus = "sim:{bus}"
address = 0x20
active_low = true

[uplinks.archive]
type = "jsonl"
path = "archive.jsonl"

[[commands]]
uplink = "local"
action = "set_relay"
actuator = "relays"
actuator_action = "set"
params.channel = {{ type = "int", min = 0, max = 7 }}
params.on = {{ type = "bool" }}
"""


@pytest.mark.timeout(60)
async def test_daemon_runs_every_driver_on_emulations_and_switches_a_relay(tmp_path: Path) -> None:
    bus = f"e2e-{uuid.uuid4().hex[:6]}"
    relay = sim_bus(bus).attach(0x20, PCF8574Chip())
    with ModbusSlaveSim() as modbus, NMEASim(rate_hz=20) as gps:
        import struct

        regs = struct.unpack(">HH", struct.pack(">f", 1234.5))
        modbus.set_values(1, "holding", 0, [*regs, 0, 12345])  # type: ignore[attr-defined]
        path = tmp_path / "gatewayd.toml"
        path.write_text(textwrap.dedent(CONFIG.format(bus=bus, modbus=modbus.path, gps=gps.path)))
        gw = Gateway(load(path))
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop), name="gateway")
        try:
            async with asyncio.timeout(20):
                await gw.ready.wait()
            replies: asyncio.Queue[CommandResult] = asyncio.Queue()

            async def reply(cmd: Command, result: CommandResult) -> None:
                await replies.put(result)

            gw.dispatcher.repliers["local"] = reply
            gw.dispatcher.submit(local_command("set_relay", "", {"channel": 2, "on": True}, "c-1"))
            async with asyncio.timeout(5):
                result = await replies.get()
            assert result.ok and result.code == 200, result
            assert relay.latch == 0b1111_1011  # type: ignore[attr-defined]  # active low

            archive = tmp_path / "state" / "archive.jsonl"
            wanted = {("env", "temperature_c"), ("env", "pressure_hpa"), ("room", "humidity_pct"),
                      ("tank", "level_m"), ("meter", "power_w"), ("meter", "energy_wh"),
                      ("gps", "lat"), ("gps", "satellites")}

            def seen() -> dict[tuple[str, str], object]:
                out = {}
                candidates = [archive, tmp_path / "archive.jsonl"]
                for p in candidates:
                    if p.exists():
                        for line in p.read_text().splitlines():
                            if line.strip():
                                r = json.loads(line)
                                out[(r.get("device"), r.get("point"))] = r.get("value")
                return out

            await wait_for(lambda: _true(wanted <= set(seen())), timeout_s=20)
            values = seen()
            assert values[("meter", "power_w")] == pytest.approx(1234.5)
            assert values[("meter", "energy_wh")] == pytest.approx(1234.5)
            assert values[("gps", "satellites")] == 9
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            drop_sim_bus(bus)
            # the spine's file uplink and queue use the loop's default executor
            await asyncio.get_running_loop().shutdown_default_executor()
