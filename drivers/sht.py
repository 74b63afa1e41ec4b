"""Sensirion SHT3x / SHT4x temperature and humidity sensors (I2C 0x44/0x45), single shot.

Every 16-bit word the chip sends is followed by a CRC-8 (polynomial 0x31, init 0xFF); a word
with a bad CRC fails the read and is counted in `crc_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Literal

from drivers.base import Buses, DeviceNotFoundError, Driver, DriverError, Reading, now_ms
from drivers.bus import I2CDevice, open_i2c_device

# (command bytes, max measurement time in s) per variant and repeatability, from the datasheets
_COMMANDS: dict[str, dict[str, tuple[bytes, float]]] = {
    "sht3x": {"high": (b"\x24\x00", 0.0155), "medium": (b"\x24\x0b", 0.0065),
              "low": (b"\x24\x16", 0.0045)},
    "sht4x": {"high": (b"\xfd", 0.0083), "medium": (b"\xf6", 0.0045), "low": (b"\xe0", 0.0016)},
}
_BREAK = b"\x30\x93"  # SHT3x: stop periodic mode
_BREAK_S = 0.001  # datasheet: the break takes up to 1 ms
_MARGIN_S = 0.002  # the chip NACKs reads until done; a little margin saves a retry
_READ_TRIES = 5


def crc8(data: bytes) -> int:
    """Sensirion CRC-8: polynomial 0x31, init 0xFF, no reflection, no final xor."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def check_words(data: bytes) -> list[int]:
    """The 16-bit words of a response of (msb, lsb, crc) triplets; ValueError on a bad CRC."""
    if len(data) % 3:
        raise ValueError(f"response of {len(data)} bytes is not a sequence of word+CRC triplets")
    words = []
    for i in range(0, len(data), 3):
        pair, crc = data[i:i + 2], data[i + 2]
        if crc8(pair) != crc:
            raise ValueError(f"CRC mismatch on word {i // 3}: got {crc:#04x}, "
                             f"expected {crc8(pair):#04x}")
        words.append((pair[0] << 8) | pair[1])
    return words


def convert(raw_t: int, raw_h: int, variant: str) -> tuple[float, float]:
    """Temperature (degC) and relative humidity (%) from raw words (datasheet formulas)."""
    t = -45.0 + 175.0 * raw_t / 65535.0
    if variant == "sht4x":
        h = max(0.0, min(100.0, -6.0 + 125.0 * raw_h / 65535.0))
    else:
        h = 100.0 * raw_h / 65535.0
    return round(t, 2), round(h, 2)


@dataclass(frozen=True, slots=True)
class SHTConfig:
    bus: str = "1"
    address: int = 0x44
    variant: Literal["sht3x", "sht4x"] = "sht3x"
    repeatability: Literal["high", "medium", "low"] = "high"

    def __post_init__(self) -> None:
        if self.address not in (0x44, 0x45, 0x46):
            raise ValueError(f"address must be 0x44, 0x45 or 0x46 (68, 69, 70), got {self.address}")


class SHT(Driver):
    """One single-shot measurement per read; points `temperature_c` and `humidity_pct`."""

    Config = SHTConfig

    def __init__(self, name: str, config: SHTConfig, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self._dev: I2CDevice | None = None
        self.crc_errors = 0

    async def open(self) -> None:
        """Check the chip answers an identification read (SHT3x status, SHT4x serial number)."""
        c = self.config
        self._dev = dev = open_i2c_device(self.buses, self.name, c.bus, c.address, c.variant)
        command, length = (b"\xf3\x2d", 3) if c.variant == "sht3x" else (b"\x89", 6)
        if c.variant == "sht3x":
            # a chip left in periodic mode (by another program, or before a restart) refuses
            # everything but fetch, break and reset: break first (ACKed when idle too)
            with contextlib.suppress(DriverError):
                await dev.send(_BREAK)
                await asyncio.sleep(_BREAK_S)
        try:
            await dev.send(command)
            await asyncio.sleep(_MARGIN_S)
            check_words(await dev.receive(length))
        except (DriverError, ValueError) as exc:
            self._dev = None
            raise DeviceNotFoundError(self.name, f"no {c.variant.upper()} answering at "
                                                 f"{c.address:#04x} on bus {c.bus}: {exc}") from exc

    async def read(self) -> list[Reading]:
        if self._dev is None:
            await self.open()
        assert self._dev is not None
        command, duration_s = _COMMANDS[self.config.variant][self.config.repeatability]
        await self._dev.send(command)
        await asyncio.sleep(duration_s + _MARGIN_S)
        data = await self._receive()
        ts = now_ms()
        try:
            raw_t, raw_h = check_words(data)
        except ValueError as exc:
            self.crc_errors += 1
            raise DriverError(self.name, f"bad response: {exc}") from exc
        t, h = convert(raw_t, raw_h, self.config.variant)
        return [Reading(self.name, "temperature_c", t, ts), Reading(self.name, "humidity_pct", h, ts)]

    async def _receive(self) -> bytes:
        assert self._dev is not None
        for attempt in range(_READ_TRIES):
            try:
                return await self._dev.receive(6)
            except DriverError:
                # a NACKed read header means "still measuring"; give it a little longer
                if attempt == _READ_TRIES - 1:
                    raise
                await asyncio.sleep(_MARGIN_S)
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, int]:
        return {"crc_errors": self.crc_errors}

    async def close(self) -> None:
        self._dev = None
