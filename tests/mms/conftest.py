"""Fixtures for the MMS tests: the simulator on a free port, a real SQLite queue, the real
dispatcher with a relay (the `log` actuator), and an `MmsUplink` wired to all of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Reading
from drivers.logact import LogActuator, LogActuatorConfig
from gatewayd.config import CommandMap, DispatchSection, ParamSpec
from gatewayd.dispatch import Dispatcher
from gatewayd.queue import Queue, QueueConfig
from gatewayd.schema import Secret
from gatewayd.uplinks.base import UplinkContext
from gatewayd.uplinks.mms import MmsConfig, MmsUplink
from gatewayd_sim.mms import (
    DEFAULT_DEVICE_ID,
    DEFAULT_TOKEN,
    RESULT_TYPE,
    FieldDef,
    MessageType,
    MmsSimulator,
)

UPLINK = "mms"
PUSH_USER = ("ops-pusher", "push-pw-7f3a")  # the simulator has none unless given
APP_TOKEN = "app-token-test-5c1d"
WIDE_TYPE = "a1b2c3d4e5f60718293a"  # fromDevice: device, temperature (double), humidity, timestamp


def wide_type() -> MessageType:
    return MessageType(
        WIDE_TYPE,
        "fromDevice",
        (
            FieldDef(1, "device", "string"),
            FieldDef(2, "temperature", "double"),
            FieldDef(3, "humidity", "double"),
            FieldDef(4, "timestamp", "date"),
        ),
    )


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `predicate()` holds (state owned by code that has no event to wait on)."""
    async with asyncio.timeout(timeout_s):
        # The queue cursor and the uplink state have no event to wait on: poll the condition.
        while not predicate():
            await asyncio.sleep(0.005)


def readings(
    n: int,
    device: str = "boiler",
    point: str = "temp_c",
    t0_ms: int = 1_718_000_000_000,
    step_ms: int = 1000,
) -> list[Reading]:
    return [Reading(device, point, 20.0 + i / 10, t0_ms + i * step_ms) for i in range(n)]


@pytest.fixture
async def sim() -> AsyncIterator[MmsSimulator]:
    async with MmsSimulator(port=0, push_users=dict([PUSH_USER]), app_tokens=[APP_TOKEN]) as s:
        s.add_message_type(wide_type())
        yield s


def base_config(sim: MmsSimulator, **overrides: Any) -> MmsConfig:
    """A config pointing at the simulator, with short timings for tests."""
    cfg = MmsConfig(
        device_id=DEFAULT_DEVICE_ID,
        token=Secret(DEFAULT_TOKEN),
        host=sim.url,
        result_message_type=RESULT_TYPE,
        request_timeout=2.0,
        poll_interval=0.1,
        backoff_base=0.05,
        backoff_cap=0.3,
        sync_202_max_wait=0.05,
        batch_size=500,
    )
    return replace(cfg, **overrides)


@dataclass
class Harness:
    """A running uplink with its queue, dispatcher and relay."""

    sim: MmsSimulator
    queue: Queue
    uplink: MmsUplink
    relay: LogActuator
    dispatcher: Dispatcher

    async def put(self, batch: list[Reading]) -> None:
        assert await self.queue.put(batch)

    def acked(self) -> int:
        return self.queue.outbox(UPLINK).acked

    async def wait_acked(self, seq: int, timeout_s: float = 5.0) -> None:
        await eventually(lambda: self.acked() >= seq, timeout_s)


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await make_harness(sim, config)`: queue, dispatcher and uplink, stopped at teardown."""
    tasks: list[asyncio.Task[Any]] = []
    queues: list[Queue] = []

    async def start(sim: MmsSimulator, config: MmsConfig) -> Harness:
        queue = Queue(tmp_path / f"queue{len(queues)}.db", QueueConfig(commit_window=0.01), uplinks=[UPLINK])
        await queue.open()
        queues.append(queue)
        relay = LogActuator("relay", LogActuatorConfig(), None)  # type: ignore[arg-type]
        commands = [
            CommandMap(action="switch", actuator="relay", params={"operand": ParamSpec("str")}),
            CommandMap(action="set", actuator="relay", params={"operand": ParamSpec("int", min=0, max=100)}),
        ]
        dispatcher = Dispatcher(commands, {"relay": relay}, DispatchSection(dedupe_window=60))
        ctx = UplinkContext(
            gateway_id="gw-test",
            state_dir=tmp_path,
            outbox=queue.outbox(UPLINK),
            submit_command=dispatcher.submit,
        )
        uplink = MmsUplink(UPLINK, config, ctx)
        dispatcher.repliers[UPLINK] = uplink.reply
        tasks.append(asyncio.create_task(queue.run(), name="test-queue"))
        tasks.append(asyncio.create_task(dispatcher.run(), name="test-dispatcher"))
        tasks.append(asyncio.create_task(uplink.run(), name="test-uplink-mms"))
        return Harness(sim, queue, uplink, relay, dispatcher)

    yield start
    for t in reversed(tasks):
        t.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    crashed = [o for o in outcomes if not isinstance(o, asyncio.CancelledError | type(None))]
    for q in queues:
        await q.close()
    assert not crashed, f"a loop crashed: {crashed!r}"


def stored_values(sim: MmsSimulator, message_type: str = "m0t0y0p0e1") -> list[tuple[Any, ...]]:
    """(sensor, value, timestamp) of every stored row of the default type, in arrival order."""
    return [(r["C_SENSOR"], r["C_VALUE"], r["C_TIMESTAMP"]) for r in sim.rows(message_type)]
