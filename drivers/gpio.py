"""Relay and GPIO boards on I2C port expanders: NXP PCF8574(A) and Microchip MCP23017.

Actions (params):
  - `set` (`channel`, `on`): switch one output;
  - `pulse` (`channel`, `ms`): switch it on, wait, switch it off again (also when cancelled);
  - `get` (): the current output states.

Every change is a read-modify-write of the output latch done as one job on the bus (nothing
else runs on the bus between the read and the write), followed by a read-back of the pins; a
mismatch (a stuck output, a chip that reset) fails the action.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from drivers.base import ActionError, Actuator, Buses
from drivers.bus import I2CDevice, RawI2C, open_i2c_device

MCP_IODIRA = 0x00
MCP_IODIRB = 0x01
MCP_GPIOA = 0x12
MCP_GPIOB = 0x13
MCP_OLATA = 0x14
MCP_OLATB = 0x15

_MAX_PULSE_MS = 600_000


@dataclass(frozen=True, slots=True)
class ExpanderConfig:
    bus: str = "1"
    address: int = 0x20
    outputs: list[int] = field(default_factory=list)  # output channels; empty: all of them
    active_low: bool = False  # most relay boards energize the relay on a low pin
    initial_on: list[int] = field(default_factory=list)  # channels switched on at start
    keep_state: bool = False  # true: leave the outputs as found at start (initial_on ignored)
    verify: bool = True  # read the pins back after each change

    CHANNELS: ClassVar[int] = 8

    def __post_init__(self) -> None:
        bad = sorted({c for c in [*self.outputs, *self.initial_on] if not 0 <= c < self.CHANNELS})
        if bad:
            raise ValueError(f"channels {bad} do not exist (0..{self.CHANNELS - 1})")
        if self.outputs and set(self.initial_on) - set(self.outputs):
            raise ValueError("initial_on lists channels that are not outputs")


@dataclass(frozen=True, slots=True)
class PCF8574Config(ExpanderConfig):
    address: int = 0x20  # PCF8574: 0x20-0x27; PCF8574A: 0x38-0x3F

    def __post_init__(self) -> None:
        ExpanderConfig.__post_init__(self)
        if not (0x20 <= self.address <= 0x27 or 0x38 <= self.address <= 0x3F):
            raise ValueError(f"address must be 0x20..0x27 or 0x38..0x3F, got {self.address:#04x}")


@dataclass(frozen=True, slots=True)
class MCP23017Config(ExpanderConfig):
    CHANNELS: ClassVar[int] = 16

    def __post_init__(self) -> None:
        ExpanderConfig.__post_init__(self)
        if not 0x20 <= self.address <= 0x27:
            raise ValueError(f"address must be 0x20..0x27, got {self.address:#04x}")


class Expander(Actuator):
    """Shared logic of the expander boards; subclasses give the chip's register access."""

    @classmethod
    def known_actions(cls, config: Any) -> frozenset[str]:
        return frozenset({"set", "pulse", "get"})

    CHANNELS: ClassVar[int] = 8
    SIM_MODEL: ClassVar[str] = ""

    def __init__(self, name: str, config: ExpanderConfig, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self._dev: I2CDevice | None = None
        self.on: dict[int, bool] = {}
        outputs = config.outputs or list(range(self.CHANNELS))
        self.outputs = sorted(set(outputs))
        self.out_mask = sum(1 << c for c in self.outputs)
        self._lock = asyncio.Lock()
        self._shadow = 0  # last latch written, for chips whose latch cannot be read
        self._inflight: asyncio.Future[int] | None = None  # the last change put on the bus

    # chip-specific, all run in the bus worker thread
    def _read_latch(self, raw: RawI2C, addr: int) -> int | None:
        """The output latch if the chip can report it, else None (use the last written)."""
        raise NotImplementedError

    def _write_latch(self, raw: RawI2C, addr: int, latch: int) -> None:
        raise NotImplementedError

    def _read_pins(self, raw: RawI2C, addr: int) -> int:
        raise NotImplementedError

    def _setup(self, raw: RawI2C, addr: int) -> None:
        """Configure directions (the MCP23017 powers up with every pin an input)."""

    def _level(self, on: bool) -> int:
        return int(on != self.config.active_low)

    async def open(self) -> None:
        c = self.config
        self._dev = dev = open_i2c_device(self.buses, self.name, c.bus, c.address, self.SIM_MODEL)
        self._shadow = 0xFFFF if c.active_low else 0x0000
        initial = None if c.keep_state else {ch: ch in c.initial_on for ch in self.outputs}

        def start(raw: RawI2C) -> int:
            found = self._read_latch(raw, dev.addr)
            if found is None:
                found = self._read_pins(raw, dev.addr)
            self._shadow = found
            self._setup(raw, dev.addr)
            return self._change(raw, initial or {}) if initial is not None else found

        self._record_latch(await dev.run(start, "initial state"))

    def _change(self, raw: RawI2C, wanted: Mapping[int, bool]) -> int:
        """Read-modify-write the latch for `wanted` channel states, then verify. Worker thread."""
        assert self._dev is not None
        addr = self._dev.addr
        latch = self._read_latch(raw, addr)
        if latch is None:
            latch = self._shadow
        for ch, on in wanted.items():
            latch = latch | (1 << ch) if self._level(on) else latch & ~(1 << ch)
        # inputs of a quasi-bidirectional port must stay high to remain readable
        latch |= self._input_high_mask()
        self._write_latch(raw, addr, latch)
        self._shadow = latch
        if self.config.verify:
            pins = self._read_pins(raw, addr)
            if (pins ^ latch) & self.out_mask:
                bad = [ch for ch in self.outputs if (pins ^ latch) >> ch & 1]
                raise ActionError(self.name, f"read-back mismatch on channel(s) {bad}: wrote "
                                             f"{latch:#06x}, pins read {pins:#06x}")
        return latch

    def _input_high_mask(self) -> int:
        return 0

    async def _set(self, wanted: dict[int, bool]) -> None:
        if self._dev is None:
            await self.open()
        assert self._dev is not None
        # the bus job completes in its worker thread even if this caller is cancelled (a command
        # timeout, a stop): shielded, so the states it wrote are recorded all the same
        self._inflight = job = asyncio.ensure_future(
            self._dev.run(lambda raw: self._change(raw, wanted), "set outputs"))
        job.add_done_callback(self._record)
        await asyncio.shield(job)

    async def _settled(self) -> None:
        """Wait for a change an earlier, cancelled command left on the bus (its outcome was
        that command's to report), so this one starts from the states it wrote."""
        job, self._inflight = self._inflight, None
        if job is not None and not job.done():
            await asyncio.wait([job])

    def _record(self, job: asyncio.Future[int]) -> None:
        if not job.cancelled() and job.exception() is None:
            self._record_latch(job.result())

    def _record_latch(self, latch: int) -> None:
        """The output states a latch value means (active-low boards invert them)."""
        self.on = {ch: bool(latch >> ch & 1) == self._level(True) for ch in self.outputs}

    def _channel(self, params: Mapping[str, Any]) -> int:
        ch = params.get("channel")
        if isinstance(ch, bool) or not isinstance(ch, int) or ch not in self.outputs:
            raise ActionError(self.name, f"channel must be one of {self.outputs}, got {ch!r}")
        return ch

    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            await self._settled()
            if action == "set":
                ch = self._channel(params)
                on = params.get("on")
                if not isinstance(on, bool):
                    raise ActionError(self.name, f"'on' must be true or false, got {on!r}")
                await self._set({ch: on})
                return {"channel": ch, "on": self.on[ch]}
            if action == "pulse":
                ch = self._channel(params)
                ms = params.get("ms")
                if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 < ms <= _MAX_PULSE_MS:
                    raise ActionError(self.name, f"'ms' must be 1..{_MAX_PULSE_MS}, got {ms!r}")
                try:
                    # the switch-on is inside: a cancel while its bus job runs (the job still
                    # completes in the worker thread) must switch the output off again too
                    await self._set({ch: True})
                    await asyncio.sleep(ms / 1000)
                finally:
                    # switch off even when the command times out or the daemon stops; the bus
                    # runs one job at a time, so this lands after an interrupted switch-on
                    await asyncio.shield(self._set({ch: False}))
                return {"channel": ch, "pulsed_ms": ms, "on": self.on[ch]}
            if action == "get":
                return self.state()
        raise ActionError(self.name, f"unknown action {action!r} (expected set, pulse or get)")

    def state(self) -> dict[str, Any]:
        return {"outputs": {str(ch): on for ch, on in self.on.items()}}

    async def close(self) -> None:
        self._dev = None


class PCF8574(Expander):
    """8 quasi-bidirectional pins; the chip has no registers: one byte out, one byte in."""

    CHANNELS = 8
    SIM_MODEL = "pcf8574"
    Config = PCF8574Config

    def _read_latch(self, raw: RawI2C, addr: int) -> int | None:
        return None  # the latch is write-only; reading returns the pin levels

    def _write_latch(self, raw: RawI2C, addr: int, latch: int) -> None:
        raw.transfer(addr, bytes([latch & 0xFF]), 0)

    def _read_pins(self, raw: RawI2C, addr: int) -> int:
        return raw.transfer(addr, b"", 1)[0]

    def _input_high_mask(self) -> int:
        return ~self.out_mask & 0xFF


class MCP23017(Expander):
    """16 pins (A0-A7 are channels 0-7, B0-B7 are 8-15), IOCON.BANK=0 register layout."""

    CHANNELS = 16
    SIM_MODEL = "mcp23017"
    Config = MCP23017Config

    def _read_latch(self, raw: RawI2C, addr: int) -> int | None:
        data = raw.transfer(addr, bytes([MCP_OLATA]), 2)
        return data[0] | (data[1] << 8)

    def _write_latch(self, raw: RawI2C, addr: int, latch: int) -> None:
        raw.transfer(addr, bytes([MCP_OLATA, latch & 0xFF, latch >> 8]), 0)

    def _read_pins(self, raw: RawI2C, addr: int) -> int:
        data = raw.transfer(addr, bytes([MCP_GPIOA]), 2)
        return data[0] | (data[1] << 8)

    def _setup(self, raw: RawI2C, addr: int) -> None:
        iodir = ~self.out_mask & 0xFFFF
        raw.transfer(addr, bytes([MCP_IODIRA, iodir & 0xFF, iodir >> 8]), 0)
        back = raw.transfer(addr, bytes([MCP_IODIRA]), 2)
        if (back[0] | back[1] << 8) != iodir:
            raise OSError(5, f"IODIR read-back {back.hex()} differs from {iodir:#06x}")

