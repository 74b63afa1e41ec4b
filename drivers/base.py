"""Core types shared by drivers and the daemon: readings, commands, driver contracts.

This module knows nothing of clouds or of the daemon: `drivers` never imports `gatewayd`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Protocol

Value = float | int | bool | str | dict[str, Any] | None


class Quality(IntEnum):
    """Quality of a reading; uplinks map it to their cloud's own codes."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2


@dataclass(frozen=True, slots=True)
class Reading:
    device: str  # local device name from config
    point: str  # local point name: "temperature_c"
    value: Value  # None only together with a non-GOOD quality
    ts_ms: int  # sampling time, UTC epoch ms, taken when the sample was read
    quality: int = Quality.GOOD


@dataclass(frozen=True, slots=True)
class Command:
    id: str  # the cloud's message id: a redelivery has the same id and the same content
    uplink: str  # name of the uplink that received it
    device: str  # local device (or actuator) the cloud addressed; "" for the gateway itself
    action: str  # uplink-side action name: an EnOS service id, an MMS action field, ...
    params: Mapping[str, Any] = field(default_factory=dict)
    received_ms: int = 0
    # Where the result goes, opaque to all but the uplink that set it (a topic, a socket...).
    reply_to: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_id: str
    ok: bool
    code: int  # 200 ok, 400 bad params, 404 unmapped, 500 actuator error, 504 timeout
    message: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


def now_ms() -> int:
    """Wall-clock time in UTC epoch milliseconds."""
    return time.time_ns() // 1_000_000


# --- errors ---------------------------------------------------------------------------------


class DriverError(Exception):
    """A device or bus failed in an expected way (NACK, timeout, bad CRC, unplugged)."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device
        self.message = message


class DeviceNotFoundError(DriverError):
    """The device did not answer, or answered with the wrong identity."""


class ReadTimeoutError(DriverError):
    """The device did not answer in time."""


class ActionError(DriverError):
    """An actuator refused or failed an action."""


# --- config schema markers ------------------------------------------------------------------
# Driver configs are frozen dataclasses. The daemon's config loader builds them from TOML by
# their type hints; these markers ask it for unit parsing and range checks. A dataclass may
# also raise ValueError in __post_init__: the loader reports it with the key path.


@dataclass(frozen=True, slots=True)
class Unit:
    kind: str  # "duration" (seconds, from "10s", "500ms") or "bytes" (from "64MiB")


@dataclass(frozen=True, slots=True)
class Range:
    min: float | None = None
    max: float | None = None


Duration = Annotated[float, Unit("duration")]  # seconds; TOML takes "10s", "500ms", "2m" or a number
ByteSize = Annotated[int, Unit("bytes")]  # bytes; TOML takes "64MiB", "512KB" or a number


# --- buses ----------------------------------------------------------------------------------


class I2CBus(Protocol):
    """The smbus2 subset drivers use; fakes implement it at register level."""

    def read_byte_data(self, addr: int, reg: int) -> int: ...
    def write_byte_data(self, addr: int, reg: int, value: int) -> None: ...
    def read_i2c_block_data(self, addr: int, reg: int, length: int) -> list[int]: ...
    def write_i2c_block_data(self, addr: int, reg: int, data: list[int]) -> None: ...


class Buses(Protocol):
    """Hands out shared bus objects by their config spec ("1", "/dev/i2c-1", "sim:bench")."""

    def i2c(self, spec: str) -> Any: ...
    def serial(self, spec: str, **settings: Any) -> Any: ...
    def modbus(self, spec: str, **settings: Any) -> Any: ...  # a shared RS-485 line, many units
    async def close(self) -> None: ...


# --- drivers --------------------------------------------------------------------------------


class Driver(ABC):
    """A sensor: `open()`, then `read()` every interval, `close()` at the end.

    Subclasses set `Config` to a frozen dataclass describing their own config keys (the keys
    besides the common name/driver/interval/timeout ones).
    """

    Config: ClassVar[type[Any]]

    def __init__(self, name: str, config: Any, buses: Buses) -> None:
        self.name = name
        self.config = config
        self.buses = buses

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare the device (identify it, load calibration). Raises DriverError."""

    @abstractmethod
    async def read(self) -> list[Reading]:
        """Sample every configured point once. Raises DriverError on a fault."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device. Never raises."""

    def stats(self) -> dict[str, int]:
        """Cumulative counters (CRC errors, exception responses, ...) for /status and metrics."""
        return {}


class Actuator(ABC):
    """Something a command can change: a relay board, a register, a serial instrument."""

    Config: ClassVar[type[Any]]

    def __init__(self, name: str, config: Any, buses: Buses) -> None:
        self.name = name
        self.config = config
        self.buses = buses

    @classmethod
    def known_actions(cls, config: Any) -> frozenset[str] | None:
        """The action names `apply` accepts with this config (checked by `gatewayd check`);
        None when any name goes."""
        return None

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare the actuator, apply its initial state. Raises DriverError."""

    @abstractmethod
    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out one action; return data for the result. Raises DriverError."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the actuator. Never raises."""

    def state(self) -> dict[str, Any]:
        """A small JSON-able view of the actuator's last known state, for /status."""
        return {}
