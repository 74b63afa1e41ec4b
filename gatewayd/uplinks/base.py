"""The uplink contract: what the core hands an uplink, and what an uplink owes the core.

New uplinks subclass `gatewayd.uplinks.engine.DeliveryUplink`: the engine runs the life cycle
and the uplink supplies only `connect()` and a `Session` (see that module). `Uplink.run()` below
is the older contract, kept for uplinks not yet ported:

An uplink owns its cloud's connection, identities and wire format. The core gives it:
- an `Outbox` over the durable queue: `lease()` the next readings past its cursor, send them,
  `ack()` on the cloud's confirmation, `quarantine()` a poison item, `rewind()` after a
  connection loss so unconfirmed items go again;
- `submit_command()`: hands a `Command` to the dispatcher, which later calls `reply()` with the
  `CommandResult`, so the uplink answers in its cloud's format.

`run()` runs until cancelled and handles its expected errors itself (`connection_loop` does the
backoff), so one cloud's trouble never stops the others.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol

import structlog

from drivers.base import Command, CommandResult, Reading
from gatewayd.backoff import Backoff, Throttle
from gatewayd.errors import UplinkAuthError, UplinkError

log = structlog.get_logger("gatewayd.uplink")


@dataclass(frozen=True, slots=True)
class Item:
    """One queued reading as an uplink sees it."""

    seq: int
    reading: Reading
    backlog: bool  # queued while this uplink was offline, or before its current connection


@dataclass(slots=True)
class Lease:
    """A batch of items past the uplink's cursor, in seq order."""

    uplink: str
    items: list[Item]

    @property
    def last_seq(self) -> int:
        return self.items[-1].seq

    def __len__(self) -> int:
        return len(self.items)


class Outbox(Protocol):
    """One uplink's view of the queue (implemented by `gatewayd.queue.Outbox`)."""

    name: str

    async def lease(self, max_items: int, max_bytes: int = 0, wait_s: float | None = None,
                    linger_s: float = 0.0) -> Lease:
        """The next items after the last lease; waits for new data up to `wait_s` (None: forever).

        Returns an empty lease if nothing arrived in time. With `linger_s`, once some data is
        there it waits up to that long more for a full batch of `max_items`. Raises
        UplinkUnavailableError once the queue is closed (shutdown), so no loop spins on it.
        """
        ...

    async def ack(self, seq: int) -> None:
        """Advance the durable cursor to `seq`: everything up to it was confirmed."""
        ...

    def rewind(self) -> None:
        """Make the next lease start again right after the durable cursor."""
        ...

    def quarantine(self, item: Item, reason: str, detail: str = "") -> None:
        """Count and log `item` as dropped for `reason`; the caller still acks past it."""
        ...

    def set_connected(self, connected: bool) -> None:
        """Tell the queue whether the cloud is reachable (decides what is backlog)."""
        ...

    def pending(self) -> int:
        """Rows queued past the durable cursor."""
        ...


class UplinkState(StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What an uplink may know of a local device: its name, driver and kind."""

    name: str
    driver: str
    kind: str  # "device" or "actuator"


@dataclass
class UplinkContext:
    gateway_id: str
    state_dir: Path
    outbox: Outbox
    submit_command: Callable[[Command], None]
    devices: Mapping[str, DeviceInfo] = field(default_factory=dict)
    metrics: Any = None  # gatewayd.metrics.Metrics, or None in unit tests
    live_first: bool = True  # the engine's two lanes (see gatewayd.uplinks.engine)
    backlog_rate: float = 0.0  # the backlog lane's pace, in the uplink's backlog_unit; 0: none


class Uplink(ABC):
    """Base class for one cloud connection. Subclasses set `Config` and implement `run`/`reply`."""

    Config: ClassVar[type[Any]]

    def __init__(self, name: str, config: Any, ctx: UplinkContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.state = UplinkState.STARTING
        self.last_error = ""
        self.state_since = time.time()
        self.sent = 0  # readings confirmed by the cloud
        self.messages = 0  # messages (requests, frames) sent
        self.log = log.bind(uplink=name)

    # -- what subclasses implement ------------------------------------------------------------

    @abstractmethod
    async def run(self) -> None:
        """Connect, deliver, receive commands; reconnect on failure. Runs until cancelled."""

    @abstractmethod
    async def reply(self, command: Command, result: CommandResult) -> None:
        """Send a command's result back to the cloud. Never raises for a lost connection."""

    def device_state(self, device: str, failing: bool, error: str, ts_ms: int) -> None:  # noqa: B027
        """A local device started (`failing`) or stopped failing. Default: ignored.

        Called from the event loop; must not block. Uplinks whose cloud has a notion of device
        health (EnOS events) report it; a failing device sends no readings to infer it from.
        """

    def status(self) -> dict[str, Any]:
        """State for /status; subclasses extend it."""
        return {
            "type": type(self).__name__,
            "state": str(self.state),
            "since": round(self.state_since, 3),
            "last_error": self.last_error,
            "sent": self.sent,
            "messages": self.messages,
            "backlog": self.ctx.outbox.pending(),
        }

    # -- helpers ------------------------------------------------------------------------------

    def set_state(self, state: UplinkState, error: str = "") -> None:
        if error:
            self.last_error = error
        if state == self.state:
            return
        self.log.info("uplink_state", state=str(state), previous=str(self.state), error=error or None)
        self.state = state
        self.state_since = time.time()
        self.ctx.outbox.set_connected(state == UplinkState.CONNECTED)
        if self.ctx.metrics is not None:
            self.ctx.metrics.uplink_state(self.name, str(state))

    def count_error(self, kind: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.uplink_errors.labels(self.name, kind).inc()

    async def connection_loop(
        self,
        session: Callable[[], Awaitable[None]],
        backoff: Backoff,
        throttle: Throttle | None = None,
        stable_s: float = 30.0,
    ) -> None:
        """Run `session()` again and again with backoff; never returns.

        `session` connects, calls `set_state(CONNECTED)`, and runs until the connection fails,
        raising an UplinkError (or OSError/TimeoutError). A session that stayed up `stable_s`
        resets the backoff. Auth failures wait the full cap. `throttle` limits attempts.
        """
        while True:
            if throttle is not None:
                wait = throttle.wait_s()
                if wait > 0:
                    self.set_state(UplinkState.BACKING_OFF)
                    await asyncio.sleep(wait)
                throttle.record()
            self.set_state(UplinkState.CONNECTING)
            started = time.monotonic()
            try:
                await session()
                delay = backoff.next_delay()
                self.set_state(UplinkState.BACKING_OFF, "session ended")
            except UplinkAuthError as exc:
                self.count_error("auth")
                self.set_state(UplinkState.AUTH_FAILED, str(exc))
                delay = backoff.cap_delay()
            except (UplinkError, OSError, TimeoutError) as exc:
                if time.monotonic() - started >= stable_s:
                    backoff.reset()
                self.count_error(type(exc).__name__)
                self.set_state(UplinkState.BACKING_OFF, f"{type(exc).__name__}: {exc}")
                delay = backoff.next_delay()
            finally:
                self.ctx.outbox.rewind()
            self.log.info("uplink_retry", delay_s=round(delay, 2), attempt=backoff.attempt)
            await asyncio.sleep(delay)

    async def pump(
        self,
        send: Callable[[Lease], Awaitable[None]],
        max_items: int,
        max_bytes: int = 0,
        wait_s: float | None = None,
        linger_s: float = 0.0,
    ) -> None:
        """Lease, send and ack until cancelled or `send` raises.

        `send` returns once the cloud confirmed the lease (after quarantining any poison
        items through the outbox); it raises UplinkError to end the session.
        """
        outbox = self.ctx.outbox
        while True:
            lease = await outbox.lease(max_items, max_bytes, wait_s, linger_s)
            if not lease.items:
                continue
            await send(lease)
            await outbox.ack(lease.last_seq)
            self.sent += len(lease)
            if self.ctx.metrics is not None:
                self.ctx.metrics.readings_sent.labels(self.name).inc(len(lease))

