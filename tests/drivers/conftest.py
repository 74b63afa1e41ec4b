"""Fixtures for the driver tests: a BusManager and a fresh emulated I2C bus per test."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from drivers.bus import BusManager
from gatewayd_sim.hw.i2c import SimI2CBus, drop_sim_bus, sim_bus
from gatewayd_sim.hw.serial import ModbusSlaveSim

_names = itertools.count()


@pytest.fixture
async def buses() -> AsyncIterator[BusManager]:
    manager = BusManager()
    try:
        yield manager
    finally:
        await manager.close()


@pytest.fixture
def sim() -> Iterator[SimI2CBus]:
    """An empty emulated bus with a unique name; its spec is `f"sim:{sim.name}"`."""
    name = f"t{next(_names)}"
    bus = sim_bus(name)
    try:
        yield bus
    finally:
        drop_sim_bus(name)


@pytest.fixture
def modbus_sim() -> Iterator[ModbusSlaveSim]:
    sim = ModbusSlaveSim(units=(1, 2))
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Await `predicate()` until it is true, or fail after `timeout_s` seconds."""
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(0.02)

