"""Bosch BME280 temperature, pressure and humidity sensor (I2C 0x76/0x77), in forced mode.

The register map and the integer compensation (datasheet BST-BME280-DS002, section 4.2.3 and
8.2) are pure and apart from I/O; `BME280.read` is the only place that touches the bus.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Literal

from drivers.base import Buses, DeviceNotFoundError, Driver, DriverError, Reading, now_ms
from drivers.bus import I2CDevice, open_i2c_device

# --- register map ---------------------------------------------------------------------------
CHIP_ID = 0x60
REG_CALIB_TP = 0x88  # 0x88..0xA1: dig_T1..dig_P9, (0xA0 reserved), dig_H1
CALIB_TP_LEN = 26
REG_CALIB_H = 0xE1  # 0xE1..0xE7: dig_H2..dig_H6
CALIB_H_LEN = 7
REG_CHIP_ID = 0xD0
REG_RESET = 0xE0
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # press[19:0], temp[19:0], hum[15:0]: 8 bytes
DATA_LEN = 8
RESET_WORD = 0xB6
STATUS_MEASURING = 0b0000_1000
STATUS_IM_UPDATE = 0b0000_0001
MODE_FORCED = 0b01

OVERSAMPLING = {0: 0, 1: 1, 2: 2, 4: 3, 8: 4, 16: 5}  # factor -> osrs field value
FILTER = {0: 0, 2: 1, 4: 2, 8: 3, 16: 4}  # IIR coefficient -> filter field value
SKIPPED_20 = 0x80000  # value of a skipped temperature or pressure measurement
SKIPPED_16 = 0x8000  # value of a skipped humidity measurement

_STARTUP_S = 0.004  # datasheet: 2 ms start-up after reset; doubled for margin
_POLL_S = 0.002


@dataclass(frozen=True, slots=True)
class Calibration:
    t1: int
    t2: int
    t3: int
    p1: int
    p2: int
    p3: int
    p4: int
    p5: int
    p6: int
    p7: int
    p8: int
    p9: int
    h1: int
    h2: int
    h3: int
    h4: int
    h5: int
    h6: int


def parse_calibration(tp: bytes, h: bytes) -> Calibration:
    """Decode the two calibration blocks (26 bytes at 0x88, 7 bytes at 0xE1)."""
    if len(tp) != CALIB_TP_LEN or len(h) != CALIB_H_LEN:
        raise ValueError("calibration blocks have the wrong length")
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack("<HhhHhhhhhhhh", tp[:24])
    h1 = tp[25]
    h2 = struct.unpack("<h", h[0:2])[0]
    h3 = h[2]
    h4 = _s12((h[3] << 4) | (h[4] & 0x0F))
    h5 = _s12((h[5] << 4) | (h[4] >> 4))
    h6 = struct.unpack("<b", h[6:7])[0]
    return Calibration(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6)


def encode_calibration(c: Calibration) -> tuple[bytes, bytes]:
    """The inverse of `parse_calibration`: the register contents of a chip with these constants."""
    tp = struct.pack("<HhhHhhhhhhhh", c.t1, c.t2, c.t3, c.p1, c.p2, c.p3, c.p4, c.p5, c.p6,
                     c.p7, c.p8, c.p9) + bytes([0, c.h1])
    h4, h5 = c.h4 & 0xFFF, c.h5 & 0xFFF
    h = struct.pack("<hB", c.h2, c.h3) + bytes([h4 >> 4, (h4 & 0x0F) | ((h5 & 0x0F) << 4),
                                                h5 >> 4]) + struct.pack("<b", c.h6)
    return tp, h


def _s12(v: int) -> int:
    return v - 0x1000 if v & 0x800 else v


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero), as the Bosch reference code does."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def compensate_t(adc_t: int, c: Calibration) -> tuple[int, int]:
    """Temperature in 0.01 degC and t_fine, from the 20-bit raw value (datasheet 4.2.3)."""
    var1 = (((adc_t >> 3) - (c.t1 << 1)) * c.t2) >> 11
    var2 = (((((adc_t >> 4) - c.t1) * ((adc_t >> 4) - c.t1)) >> 12) * c.t3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_p(adc_p: int, t_fine: int, c: Calibration) -> int:
    """Pressure in Pa as unsigned Q24.8 (value / 256 = Pa), 64-bit variant (datasheet 4.2.3)."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * c.p6
    var2 = var2 + ((var1 * c.p5) << 17)
    var2 = var2 + (c.p4 << 35)
    var1 = ((var1 * var1 * c.p3) >> 8) + ((var1 * c.p2) << 12)
    var1 = (((1 << 47) + var1) * c.p1) >> 33
    if var1 == 0:
        return 0  # avoids a division by zero on a chip with broken calibration
    p = 1048576 - adc_p
    p = _cdiv(((p << 31) - var2) * 3125, var1)
    var1 = (c.p9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (c.p8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (c.p7 << 4)


def compensate_h(adc_h: int, t_fine: int, c: Calibration) -> int:
    """Relative humidity in %RH as unsigned Q22.10 (value / 1024 = %RH) (datasheet 4.2.3)."""
    v = t_fine - 76800
    v = ((((adc_h << 14) - (c.h4 << 20) - (c.h5 * v)) + 16384) >> 15) * (
        ((((((v * c.h6) >> 10) * (((v * c.h3) >> 11) + 32768)) >> 10) + 2097152) * c.h2 + 8192)
        >> 14
    )
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * c.h1) >> 4)
    v = max(0, min(v, 419430400))
    return v >> 12


def split_raw(data: bytes) -> tuple[int, int, int]:
    """(adc_t, adc_p, adc_h) from the 8 data bytes starting at 0xF7."""
    adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
    adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
    adc_h = (data[6] << 8) | data[7]
    return adc_t, adc_p, adc_h


def measurement_time_s(osrs_t: int, osrs_p: int, osrs_h: int) -> float:
    """Maximum forced-mode measurement time (datasheet 9.1), from the oversampling factors."""
    ms = 1.25 + 2.3 * osrs_t
    if osrs_p:
        ms += 2.3 * osrs_p + 0.575
    if osrs_h:
        ms += 2.3 * osrs_h + 0.575
    return ms / 1000


Oversampling = Literal[0, 1, 2, 4, 8, 16]


@dataclass(frozen=True, slots=True)
class BME280Config:
    bus: str = "1"  # "1", "/dev/i2c-1", or "sim:NAME" for the emulated bus
    address: int = 0x76
    oversampling_t: Oversampling = 1
    oversampling_p: Oversampling = 1
    oversampling_h: Oversampling = 1
    filter: Literal[0, 2, 4, 8, 16] = 0  # IIR filter coefficient; 0 is off

    def __post_init__(self) -> None:
        if self.address not in (0x76, 0x77):
            raise ValueError(f"address must be 0x76 or 0x77 (118 or 119), got {self.address}")
        if self.oversampling_t == 0:
            raise ValueError("oversampling_t cannot be 0: temperature is needed to compensate")


class BME280(Driver):
    """Reads the calibration once on open, then one forced measurement per read."""

    Config = BME280Config

    def __init__(self, name: str, config: BME280Config, buses: Buses) -> None:
        super().__init__(name, config, buses)
        self._dev: I2CDevice | None = None
        self._cal: Calibration | None = None

    async def open(self) -> None:
        c = self.config
        self._dev = dev = open_i2c_device(self.buses, self.name, c.bus, c.address, "bme280")
        chip = (await dev.read(REG_CHIP_ID, 1))[0]
        if chip != CHIP_ID:
            raise DeviceNotFoundError(
                self.name, f"chip id {chip:#04x} at {c.address:#04x}, expected {CHIP_ID:#04x} (BME280)")
        await dev.write(REG_RESET, bytes([RESET_WORD]))
        await asyncio.sleep(_STARTUP_S)
        await self._wait_idle(STATUS_IM_UPDATE)
        tp = await dev.read(REG_CALIB_TP, CALIB_TP_LEN)
        h = await dev.read(REG_CALIB_H, CALIB_H_LEN)
        self._cal = parse_calibration(tp, h)
        # config is only honoured in sleep mode, which the chip is in after reset
        await dev.write(REG_CONFIG, bytes([FILTER[c.filter] << 2]))

    async def _wait_idle(self, mask: int) -> None:
        assert self._dev is not None
        for _ in range(50):
            if not (await self._dev.read(REG_STATUS, 1))[0] & mask:
                return
            await asyncio.sleep(_POLL_S)
        raise DriverError(self.name, "measurement did not complete (status register stays busy)")

    async def read(self) -> list[Reading]:
        if self._dev is None or self._cal is None:
            await self.open()
        assert self._dev is not None and self._cal is not None
        c = self.config
        # ctrl_hum takes effect only after the following write to ctrl_meas (datasheet 5.4.3)
        await self._dev.write(REG_CTRL_HUM, bytes([OVERSAMPLING[c.oversampling_h]]))
        meas = (OVERSAMPLING[c.oversampling_t] << 5) | (OVERSAMPLING[c.oversampling_p] << 2) | MODE_FORCED
        await self._dev.write(REG_CTRL_MEAS, bytes([meas]))
        await asyncio.sleep(measurement_time_s(c.oversampling_t, c.oversampling_p, c.oversampling_h))
        await self._wait_idle(STATUS_MEASURING)
        data = await self._dev.read(REG_DATA, DATA_LEN)
        ts = now_ms()
        return self.convert(data, ts)

    def convert(self, data: bytes, ts: int) -> list[Reading]:
        """Readings from the 8 raw data bytes (skipped measurements are left out)."""
        assert self._cal is not None
        adc_t, adc_p, adc_h = split_raw(data)
        if adc_t == SKIPPED_20:
            raise DriverError(self.name, "temperature measurement skipped (chip reset or misconfigured)")
        t, t_fine = compensate_t(adc_t, self._cal)
        out = [Reading(self.name, "temperature_c", t / 100, ts)]
        if self.config.oversampling_p and adc_p != SKIPPED_20:
            p_hpa = compensate_p(adc_p, t_fine, self._cal) / 25600
            out.append(Reading(self.name, "pressure_hpa", round(p_hpa, 4), ts))
        if self.config.oversampling_h and adc_h != SKIPPED_16:
            h_pct = compensate_h(adc_h, t_fine, self._cal) / 1024
            out.append(Reading(self.name, "humidity_pct", round(h_pct, 3), ts))
        return out

    async def close(self) -> None:
        self._dev = None
        self._cal = None
