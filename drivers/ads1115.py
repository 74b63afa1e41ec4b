"""TI ADS1115 16-bit ADC (I2C 0x48-0x4B): single-shot conversion per configured point.

Each point chooses its input (single-ended or differential), gain and data rate, and a linear
scale to engineering units (e.g. a 4-20 mA loop across a shunt mapped to 0-10 bar). A value
outside the point's valid band (an open 4-20 mA loop reads below 3.8 mA) is reported with BAD
quality and no value.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from drivers.base import Buses, DeviceNotFoundError, Driver, DriverError, Quality, Reading, now_ms
from drivers.bus import I2CDevice, open_i2c_device

REG_CONVERSION = 0x00
REG_CONFIG = 0x01
REG_LO_THRESH = 0x02
REG_HI_THRESH = 0x03
OS_START = 0x8000  # write: start a single conversion; read: 1 = idle
MODE_SINGLE = 0x0100
COMP_DISABLE = 0x0003
CONFIG_DEFAULT = 0x8583

# MUX field -> (positive pin, negative pin or None for GND)
MUX_PINS: dict[int, tuple[int, int | None]] = {
    0: (0, 1), 1: (0, 3), 2: (1, 3), 3: (2, 3), 4: (0, None), 5: (1, None), 6: (2, None), 7: (3, None),
}
CHANNELS = {"0-1": 0, "0-3": 1, "1-3": 2, "2-3": 3, "0": 4, "1": 5, "2": 6, "3": 7}
PGA_FSR = {0: 6.144, 1: 4.096, 2: 2.048, 3: 1.024, 4: 0.512, 5: 0.256, 6: 0.256, 7: 0.256}
_PGA_BY_FSR = {6.144: 0, 4.096: 1, 2.048: 2, 1.024: 3, 0.512: 4, 0.256: 5}
DATA_RATES = {0: 8, 1: 16, 2: 32, 3: 64, 4: 128, 5: 250, 6: 475, 7: 860}
_DR_BY_RATE = {v: k for k, v in DATA_RATES.items()}
_CONVERSION_MARGIN = 1.1  # datasheet: data rate tolerance is +-10 %
_POLL_S = 0.001


@dataclass(frozen=True, slots=True)
class ADCPoint:
    channel: str = "0"  # "0".."3" single-ended, or "0-1", "0-3", "1-3", "2-3" differential
    gain_v: float = 2.048  # full-scale range: 6.144, 4.096, 2.048, 1.024, 0.512 or 0.256 V
    rate_sps: int = 128  # 8, 16, 32, 64, 128, 250, 475 or 860
    shunt_ohms: float | None = None  # set: the point measures current in mA across this shunt
    in_min: float = 0.0  # input (V, or mA with a shunt) that maps to out_min
    in_max: float = 1.0
    out_min: float = 0.0
    out_max: float = 1.0
    valid_min: float | None = None  # input below this is a fault (open loop): bad quality
    valid_max: float | None = None
    decimals: int = 4

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {self.channel!r}")
        if self.gain_v not in _PGA_BY_FSR:
            raise ValueError(f"gain_v must be one of {', '.join(map(str, _PGA_BY_FSR))}")
        if self.rate_sps not in _DR_BY_RATE:
            raise ValueError(f"rate_sps must be one of {', '.join(map(str, _DR_BY_RATE))}")
        if self.in_max == self.in_min:
            raise ValueError("in_min and in_max must differ")
        if self.shunt_ohms is not None and self.shunt_ohms <= 0:
            raise ValueError("shunt_ohms must be positive")

    def config_word(self) -> int:
        """The config register value that starts this point's single-shot conversion."""
        return (OS_START | (CHANNELS[self.channel] << 12) | (_PGA_BY_FSR[self.gain_v] << 9)
                | MODE_SINGLE | (_DR_BY_RATE[self.rate_sps] << 5) | COMP_DISABLE)

    def input_value(self, code: int) -> float:
        """Volts (or mA with a shunt) from a raw two's-complement conversion code."""
        signed = code - 0x10000 if code & 0x8000 else code
        volts = signed * self.gain_v / 32768
        return volts / self.shunt_ohms * 1000 if self.shunt_ohms is not None else volts

    def scale(self, x: float) -> float:
        """Linear map of the input to engineering units."""
        return self.out_min + (x - self.in_min) * (self.out_max - self.out_min) / (self.in_max - self.in_min)

    def valid(self, x: float) -> bool:
        return not ((self.valid_min is not None and x < self.valid_min)
                    or (self.valid_max is not None and x > self.valid_max))


@dataclass(frozen=True, slots=True)
class ADS1115Config:
    bus: str = "1"
    address: int = 0x48
    points: dict[str, ADCPoint] = field(default_factory=lambda: {"ain0_v": ADCPoint()})

    def __post_init__(self) -> None:
        if not 0x48 <= self.address <= 0x4B:
            raise ValueError(f"address must be 0x48..0x4B (72..75), got {self.address}")
        if not self.points:
            raise ValueError("points: configure at least one point")


class ADS1115(Driver):
    """Converts each point in turn; an out-of-band point is a BAD reading, not an error."""

    Config = ADS1115Config

    def __init__(self, name: str, config: ADS1115Config, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self._dev: I2CDevice | None = None

    async def open(self) -> None:
        """Check the chip answers: its config register must read back (any value)."""
        c = self.config
        self._dev = dev = open_i2c_device(self.buses, self.name, c.bus, c.address, "ads1115")
        try:
            await dev.read(REG_CONFIG, 2)
        except DriverError as exc:
            self._dev = None
            raise DeviceNotFoundError(self.name, f"no ADS1115 answering at {c.address:#04x} "
                                                 f"on bus {c.bus}: {exc.message}") from exc

    async def convert(self, point: ADCPoint) -> int:
        """One single-shot conversion; returns the raw 16-bit code."""
        assert self._dev is not None
        word = point.config_word()
        await self._dev.write(REG_CONFIG, word.to_bytes(2, "big"))
        await asyncio.sleep(_CONVERSION_MARGIN / point.rate_sps)
        for _ in range(20):
            status = int.from_bytes(await self._dev.read(REG_CONFIG, 2), "big")
            if status & OS_START:
                if (status & 0x7FFF) != (word & 0x7FFF):
                    raise DriverError(self.name, f"config readback {status:#06x} differs from "
                                                 f"{word:#06x} (chip reset or not an ADS1115)")
                return int.from_bytes(await self._dev.read(REG_CONVERSION, 2), "big")
            await asyncio.sleep(_POLL_S)
        raise DriverError(self.name, "conversion did not complete")

    async def read(self) -> list[Reading]:
        if self._dev is None:
            await self.open()
        out = []
        for name, point in self.config.points.items():
            code = await self.convert(point)
            ts = now_ms()
            x = point.input_value(code)
            if point.valid(x):
                # + 0.0: a value that rounds to zero from below is 0.0, not -0.0
                out.append(Reading(self.name, name, round(point.scale(x), point.decimals) + 0.0, ts))
            else:
                out.append(Reading(self.name, name, None, ts, Quality.BAD))
        return out

    async def close(self) -> None:
        self._dev = None
