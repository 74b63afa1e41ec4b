"""Fixtures for the Operations Hub tests: the simulator on a free port, the real SQLite queue,
the real dispatcher with `log` actuators, and an uplink built from a TOML-shaped table."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Reading
from drivers.logact import LogActuator, LogActuatorConfig
from gatewayd.config import CommandMap, DispatchSection, ParamSpec
from gatewayd.dispatch import Dispatcher
from gatewayd.metrics import Metrics
from gatewayd.queue import Queue, QueueConfig
from gatewayd.schema import Builder
from gatewayd.uplinks.base import DeviceInfo, UplinkContext, UplinkState
from gatewayd.uplinks.opshub import OpsHubConfig, OpsHubUplink
from gatewayd_sim.opshub import OpsHubSimulator

ACCOUNT = "REST_DEMO"
PASSWORD = "s3cret-pw"
GATEWAY = "01-23-45-67-89-ab"
UPLINK = "opshub"
T0_MS = 1_795_000_000_000  # 2026-11-18T...Z, a fixed sampling time base


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0,
                     what: str = "condition") -> None:
    """Poll local state (queue cursors, actuator logs) until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def build_config(table: dict[str, Any]) -> OpsHubConfig:
    """Build the uplink's config exactly as the config loader does; fail on any problem."""
    b = Builder(env={"OPSHUB_PW": PASSWORD})
    cfg = b.build(OpsHubConfig, table, "uplinks.opshub")
    assert not b.errors, b.errors
    return cfg  # type: ignore[no-any-return]


def base_table(sim: OpsHubSimulator, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "url": sim.url, "allow_http": True, "username": ACCOUNT, "password_env": "OPSHUB_PW",
        "gateway_id": GATEWAY, "poll_interval": "50ms", "request_timeout": "2s",
        "backoff_base": "20ms", "backoff_cap": "200ms", "min_login_interval": "20ms",
    }
    table.update(overrides)
    return table


def error_count(metrics: Metrics) -> float:
    """Every uplink error counted, of any kind."""
    total = 0.0
    for metric in metrics.registry.collect():
        if metric.name == "gatewayd_uplink_errors":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


@dataclass
class Rig:
    """A running gateway slice: queue, dispatcher, actuators and the uplink under test."""

    queue: Queue
    metrics: Metrics
    dispatcher: Dispatcher
    actuators: dict[str, LogActuator]
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    uplink: OpsHubUplink | None = None

    @property
    def outbox(self) -> Any:
        return self.queue.outbox(UPLINK)

    async def put(self, readings: list[Reading]) -> None:
        assert await self.queue.put(readings)

    def start(self, config: OpsHubConfig) -> OpsHubUplink:
        ctx = UplinkContext(gateway_id="gw", state_dir=Path("."), outbox=self.outbox,
                            submit_command=self.dispatcher.submit,
                            devices={n: DeviceInfo(n, "log", "actuator") for n in self.actuators},
                            metrics=self.metrics)
        self.uplink = OpsHubUplink(UPLINK, config, ctx)
        self.dispatcher.repliers[UPLINK] = self.uplink.reply
        self.tasks.append(asyncio.create_task(self.uplink.run(), name="test-uplink[opshub]"))
        return self.uplink

    async def wait_state(self, state: UplinkState, timeout_s: float = 5.0) -> None:
        await wait_until(lambda: self.uplink is not None and self.uplink.state == state,
                         timeout_s, f"uplink state {state}")

    async def wait_acked(self, timeout_s: float = 10.0) -> None:
        await wait_until(lambda: self.outbox.acked >= self.queue.tail, timeout_s, "queue drained")


COMMAND_MAP = (
    CommandMap(action="relay", actuator="relays", uplink=UPLINK, device="*",
               params={"channel": ParamSpec("int", min=1, max=8), "state": ParamSpec("bool")}),
    CommandMap(action="set", actuator="pump", uplink=UPLINK, device="*",
               params={"channel": ParamSpec("int", min=0, max=7),
                       "value": ParamSpec("float", min=0, max=100)}),
)


@pytest.fixture
async def sim() -> AsyncIterator[OpsHubSimulator]:
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, idle_timeout_s=600) as s:
        yield s


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    metrics = Metrics()
    queue = Queue(tmp_path / "queue.db", QueueConfig(commit_window=0.005, gc_interval=0.5),
                  [UPLINK], metrics)
    await queue.open()
    actuators = {n: LogActuator(n, LogActuatorConfig(), None) for n in ("relays", "pump")}
    dispatcher = Dispatcher(COMMAND_MAP, actuators, DispatchSection(), metrics=metrics)
    r = Rig(queue, metrics, dispatcher, actuators)
    r.tasks.append(asyncio.create_task(queue.run(), name="test-queue"))
    r.tasks.append(asyncio.create_task(dispatcher.run(), name="test-dispatcher"))
    try:
        yield r
    finally:
        for t in reversed(r.tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await queue.close()


def readings(device: str, point: str, values: list[Any], t0: int = T0_MS,
             step_ms: int = 1000) -> list[Reading]:
    return [Reading(device, point, v, t0 + i * step_ms) for i, v in enumerate(values)]

