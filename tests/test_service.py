"""The service in-process: driver counters reach /status and /metrics; shutdown is orderly."""

from __future__ import annotations

import asyncio
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import drivers
from drivers.base import Driver, Reading, now_ms
from gatewayd.config import load
from gatewayd.service import Gateway


@dataclass(frozen=True)
class CountingConfig:
    crc_every: int = 2


class CountingDriver(Driver):
    """Counts a pretend CRC error on every other read, as real serial drivers do."""

    Config = CountingConfig

    def __init__(self, name: str, config: CountingConfig, buses: object) -> None:
        super().__init__(name, config, buses)  # type: ignore[arg-type]
        self.reads = 0

    async def read(self) -> list[Reading]:
        self.reads += 1
        return [Reading(self.name, "x", float(self.reads), now_ms())]

    def stats(self) -> dict[str, int]:
        return {"reads": self.reads, "crc_errors": self.reads // self.config.crc_every}


async def test_driver_stats_in_status_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(drivers.DRIVERS, "counting", f"{__name__}:CountingDriver")
    cfg_path = tmp_path / "g.toml"
    cfg_path.write_text(textwrap.dedent(f"""
        [gateway]
        id = "svc"
        state_dir = "{tmp_path}"
        [health]
        enabled = false
        [[devices]]
        name = "meter"
        driver = "counting"
        interval = "10ms"
        [uplinks.archive]
        type = "jsonl"
        path = "a.jsonl"
    """))
    gw = Gateway(load(cfg_path))
    stop = asyncio.Event()
    runner = asyncio.create_task(gw.run(stop))
    try:
        async with asyncio.timeout(10):
            await gw.ready.wait()
            while gw.samplers[0].driver.stats()["crc_errors"] < 3:
                await asyncio.sleep(0.01)  # polling the driver's counter, bounded by the timeout
        status = await gw.status()
        assert status["devices"]["meter"]["stats"]["crc_errors"] >= 3
        value = gw.metrics.registry.get_sample_value(
            "gatewayd_driver_events_total", {"device": "meter", "event": "crc_errors"})
        assert value is not None and value >= 3
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
    assert gw.queue is not None and gw.queue.outbox("archive").pending() == 0  # flushed at stop
