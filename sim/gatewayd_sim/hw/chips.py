"""Register-level models of the supported I2C chips, faithful to their datasheets.

Each model is driven by physical quantities (a temperature, a voltage on a pin, a pin pulled
low) and produces what the real chip would put on the wire. `animate=True` (used for chips the
bus creates on its own, e.g. for the bench) makes the physical values drift slowly over time.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Callable

from drivers import ads1115 as ads
from drivers import bme280 as bme
from drivers import gpio
from drivers.sht import crc8
from gatewayd_sim.hw.i2c import RegisterChip, SimChip


def _busy() -> OSError:
    return OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))


def _wave(period_s: float, phase: float = 0.0) -> float:
    """A slow sine in [-1, 1] for animated chips."""
    return math.sin(2 * math.pi * time.time() / period_s + phase)


def _bisect(f, target: float, lo: int, hi: int, increasing: bool) -> int:  # type: ignore[no-untyped-def]
    """The integer x in [lo, hi] where the monotonic f(x) comes closest to `target`."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return lo if abs(f(lo) - target) <= abs(f(hi) - target) else hi


# --- BME280 ---------------------------------------------------------------------------------

# T and P constants are the worked example of the Bosch BMP280 datasheet (same compensation as
# the BME280); the humidity constants come from a production BME280.
REAL_CALIBRATION = bme.Calibration(
    t1=27504, t2=26435, t3=-1000,
    p1=36477, p2=-10685, p3=3024, p4=2855, p5=140, p6=-7, p7=15500, p8=-14600, p9=6000,
    h1=75, h2=362, h3=0, h4=313, h5=50, h6=30,
)


def float_t(adc_t: float, c: bme.Calibration) -> tuple[float, float]:
    """Datasheet 8.1 (double precision): temperature in degC and t_fine."""
    var1 = (adc_t / 16384.0 - c.t1 / 1024.0) * c.t2
    var2 = ((adc_t / 131072.0 - c.t1 / 8192.0) ** 2) * c.t3
    t_fine = var1 + var2
    return t_fine / 5120.0, t_fine


def float_p(adc_p: float, t_fine: float, c: bme.Calibration) -> float:
    """Datasheet 8.1 (double precision): pressure in Pa."""
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * c.p6 / 32768.0
    var2 = var2 + var1 * c.p5 * 2.0
    var2 = var2 / 4.0 + c.p4 * 65536.0
    var1 = (c.p3 * var1 * var1 / 524288.0 + c.p2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * c.p1
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = c.p9 * p * p / 2147483648.0
    var2 = p * c.p8 / 32768.0
    return p + (var1 + var2 + c.p7) / 16.0


def float_h(adc_h: float, t_fine: float, c: bme.Calibration) -> float:
    """Datasheet 8.1 (double precision): relative humidity in %, not clamped."""
    v = t_fine - 76800.0
    v = (adc_h - (c.h4 * 64.0 + c.h5 / 16384.0 * v)) * (
        c.h2 / 65536.0 * (1.0 + c.h6 / 67108864.0 * v * (1.0 + c.h3 / 67108864.0 * v)))
    return v * (1.0 - c.h1 * v / 524288.0)


def bme280_raw(temperature_c: float, pressure_hpa: float, humidity_pct: float,
               c: bme.Calibration = REAL_CALIBRATION) -> tuple[int, int, int]:
    """The raw (adc_t, adc_p, adc_h) a BME280 with calibration `c` reports for these values."""
    adc_t = _bisect(lambda x: float_t(x, c)[0], temperature_c, 0, (1 << 20) - 1, True)
    t_fine = float_t(adc_t, c)[1]
    adc_p = _bisect(lambda x: float_p(x, t_fine, c), pressure_hpa * 100, 0, (1 << 20) - 1, False)
    adc_h = _bisect(lambda x: float_h(x, t_fine, c), humidity_pct, 0, 0xFFFF, True)
    return adc_t, adc_p, adc_h


class BME280Chip(RegisterChip):
    """BME280: chip id, calibration NVM, forced mode with datasheet timing, soft reset."""

    model = "bme280"

    def __init__(self, *, animate: bool = False, calibration: bme.Calibration = REAL_CALIBRATION,
                 address_id: int = bme.CHIP_ID) -> None:
        super().__init__()
        self.animate = animate
        self.calibration = calibration
        self.temperature_c = 21.5
        self.pressure_hpa = 1013.25
        self.humidity_pct = 45.0
        self.measurements = 0
        self._done_at = 0.0
        self._pending: bytes | None = None
        self.regs[bme.REG_CHIP_ID] = address_id
        tp, h = bme.encode_calibration(calibration)
        self.regs[bme.REG_CALIB_TP:bme.REG_CALIB_TP + len(tp)] = tp
        self.regs[bme.REG_CALIB_H:bme.REG_CALIB_H + len(h)] = h
        self._reset()

    def _reset(self) -> None:
        for reg in (bme.REG_CTRL_HUM, bme.REG_CTRL_MEAS, bme.REG_CONFIG):
            self.regs[reg] = 0
        self._ctrl_hum_active = 0
        # data registers hold the "skipped" values until the first measurement
        self.regs[bme.REG_DATA:bme.REG_DATA + 8] = bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])
        self._pending = None

    def physical(self) -> tuple[float, float, float]:
        if not self.animate:
            return self.temperature_c, self.pressure_hpa, self.humidity_pct
        return (self.temperature_c + 2.0 * _wave(600), self.pressure_hpa + 1.5 * _wave(900, 1.0),
                min(100.0, max(0.0, self.humidity_pct + 5.0 * _wave(700, 2.0))))

    def _settle(self) -> None:
        if self._pending is not None and time.monotonic() >= self._done_at:
            self.regs[bme.REG_DATA:bme.REG_DATA + 8] = self._pending
            self._pending = None
            self.regs[bme.REG_CTRL_MEAS] &= 0b1111_1100  # forced mode returns to sleep

    def read_register(self, reg: int) -> int:
        self._settle()
        if reg == bme.REG_STATUS:
            return bme.STATUS_MEASURING if self._pending is not None else 0
        return self.regs[reg]

    def write_register(self, reg: int, value: int) -> None:
        if reg == bme.REG_RESET:
            if value == bme.RESET_WORD:
                self._reset()
            return
        if reg == bme.REG_CTRL_HUM:
            self.regs[reg] = value & 0x07
        elif reg == bme.REG_CTRL_MEAS:
            self.regs[reg] = value
            self._ctrl_hum_active = self.regs[bme.REG_CTRL_HUM]
            if value & 0b11 in (0b01, 0b10):
                self._start(value)
        elif reg in (bme.REG_CONFIG,):
            self.regs[reg] = value
        # calibration, id and data registers are read-only

    def _start(self, ctrl_meas: int) -> None:
        factor = {v: k for k, v in bme.OVERSAMPLING.items()}
        fields = ((ctrl_meas >> 5) & 0x07, (ctrl_meas >> 2) & 0x07, self._ctrl_hum_active)
        osrs_t, osrs_p, osrs_h = (factor.get(min(f, 5), 16) for f in fields)
        adc_t, adc_p, adc_h = bme280_raw(*self.physical(), self.calibration)
        if not osrs_t:
            adc_t = bme.SKIPPED_20
        if not osrs_p:
            adc_p = bme.SKIPPED_20
        if not osrs_h:
            adc_h = bme.SKIPPED_16
        self._pending = bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
                               adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4,
                               adc_h >> 8, adc_h & 0xFF])
        self._done_at = time.monotonic() + bme.measurement_time_s(osrs_t, osrs_p, osrs_h)
        self.measurements += 1


# --- SHT3x / SHT4x --------------------------------------------------------------------------


def sht_words(temperature_c: float, humidity_pct: float, variant: str) -> tuple[int, int]:
    """Raw (t, rh) words for the physical values (datasheet conversion formulas, inverted)."""
    raw_t = round((temperature_c + 45.0) * 65535 / 175.0)
    if variant == "sht4x":
        raw_h = round((humidity_pct + 6.0) * 65535 / 125.0)
    else:
        raw_h = round(humidity_pct * 65535 / 100.0)
    return max(0, min(0xFFFF, raw_t)), max(0, min(0xFFFF, raw_h))


class SHTChip(SimChip):
    """SHT3x or SHT4x: single-shot commands, measurement time, CRC-8 on every word.

    `corrupt_crc` (fault switch) flips the CRC bytes of the next responses.
    """

    model = "sht3x"

    def __init__(self, *, animate: bool = False, variant: str = "sht3x") -> None:
        super().__init__()
        self.variant = variant
        self.animate = animate
        self.temperature_c = 22.0
        self.humidity_pct = 50.0
        self.corrupt_crc = False
        self.serial = 0x1A2B3C4D
        self.measurements = 0
        self._out: bytes | None = None
        self._ready_at = 0.0

    def write(self, data: bytes) -> None:
        if self.variant == "sht4x":
            if len(data) != 1:
                raise _busy()
            cmd = data[0]
            durations = {0xFD: 0.0083, 0xF6: 0.0045, 0xE0: 0.0016}
            if cmd in durations:
                self._measure(durations[cmd])
            elif cmd == 0x89:
                self._respond(self.serial >> 16, self.serial & 0xFFFF, 0.0)
            elif cmd == 0x94:
                self._out = None
            else:
                raise _busy()
            return
        if len(data) != 2:
            raise _busy()
        cmd = (data[0] << 8) | data[1]
        durations = {0x2400: 0.015, 0x240B: 0.006, 0x2416: 0.004,
                     0x2C06: 0.015, 0x2C0D: 0.006, 0x2C10: 0.004}
        if cmd in durations:
            self._measure(durations[cmd])
        elif cmd == 0xF32D:  # read status register
            self._respond(0x0000, None, 0.0)
        elif cmd == 0x3780:  # read serial number
            self._respond(self.serial >> 16, self.serial & 0xFFFF, 0.0)
        elif cmd == 0x30A2:  # soft reset
            self._out = None
        else:
            raise _busy()  # unknown commands are not acknowledged

    def _measure(self, duration_s: float) -> None:
        t, h = self.temperature_c, self.humidity_pct
        if self.animate:
            t, h = t + 1.5 * _wave(500), min(100.0, max(0.0, h + 4 * _wave(650, 0.5)))
        raw_t, raw_h = sht_words(t, h, self.variant)
        self.measurements += 1
        self._respond(raw_t, raw_h, duration_s)

    def _respond(self, w1: int, w2: int | None, delay_s: float) -> None:
        out = bytearray()
        for w in (w1, w2):
            if w is None:
                continue
            pair = bytes([w >> 8, w & 0xFF])
            crc = crc8(pair)
            out += pair + bytes([crc ^ 0xFF if self.corrupt_crc else crc])
        self._out = bytes(out)
        self._ready_at = time.monotonic() + delay_s

    def read(self, n: int) -> bytes:
        # no clock stretching: the chip NACKs its read header until the result is ready
        if self._out is None or time.monotonic() < self._ready_at:
            raise _busy()
        out, self._out = self._out[:n], None
        return out.ljust(n, b"\xff")


# --- ADS1115 --------------------------------------------------------------------------------


class ADS1115Chip(SimChip):
    """ADS1115: pointer register, 16-bit big-endian registers, OS bit semantics, PGA and MUX."""

    model = "ads1115"

    def __init__(self, *, animate: bool = False) -> None:
        super().__init__()
        self.animate = animate
        self.volts = [0.0, 0.0, 0.0, 0.0]  # AIN0..AIN3 against GND
        self.pointer = 0
        self.regs = {ads.REG_CONVERSION: 0, ads.REG_CONFIG: ads.CONFIG_DEFAULT,
                     ads.REG_LO_THRESH: 0x8000, ads.REG_HI_THRESH: 0x7FFF}
        self.conversions = 0
        self._done_at = 0.0
        self._converting_config: int | None = None

    def _inputs(self) -> list[float]:
        if not self.animate:
            return self.volts
        return [v + 0.05 * _wave(300, i) for i, v in enumerate(self.volts)]

    def code_for(self, config: int) -> int:
        """The conversion result for a config word, from the present pin voltages."""
        pos, neg = ads.MUX_PINS[(config >> 12) & 0x07]
        v = self._inputs()
        diff = v[pos] - (v[neg] if neg is not None else 0.0)
        fsr = ads.PGA_FSR[(config >> 9) & 0x07]
        code = round(diff / fsr * 32768)
        return max(-32768, min(32767, code)) & 0xFFFF

    def _settle(self) -> None:
        if self._converting_config is not None and time.monotonic() >= self._done_at:
            self.regs[ads.REG_CONVERSION] = self.code_for(self._converting_config)
            self._converting_config = None
            self.conversions += 1

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0] & 0x03
        if len(data) >= 3:
            value = (data[1] << 8) | data[2]
            if self.pointer == ads.REG_CONVERSION:
                return  # read-only
            if self.pointer == ads.REG_CONFIG:
                self._settle()
                self.regs[ads.REG_CONFIG] = value & 0x7FFF
                continuous = not value & ads.MODE_SINGLE
                if (value & ads.OS_START and self._converting_config is None) or continuous:
                    self._converting_config = value
                    self._done_at = time.monotonic() + 1.0 / ads.DATA_RATES[(value >> 5) & 0x07]
            else:
                self.regs[self.pointer] = value

    def read(self, n: int) -> bytes:
        self._settle()
        cfg = self.regs[ads.REG_CONFIG]
        if self.pointer == ads.REG_CONFIG:
            value = cfg | (0 if self._converting_config is not None else ads.OS_START)
        elif self.pointer == ads.REG_CONVERSION and not cfg & ads.MODE_SINGLE:
            value = self.code_for(cfg)  # continuous mode: always a fresh result
        else:
            value = self.regs[self.pointer]
        return bytes([value >> 8, value & 0xFF] * ((n + 1) // 2))[:n]


# --- GPIO expanders -------------------------------------------------------------------------


class PCF8574Chip(SimChip):
    """PCF8574: quasi-bidirectional port; a write sets the latch, a read returns the pins.

    `pulled_low` are pins held low from outside; `stuck` forces pins low (a fault that read-back
    verification must catch).
    """

    model = "pcf8574"

    def __init__(self, *, animate: bool = False) -> None:
        super().__init__()
        self.latch = 0xFF  # power-on: all high (weak pull-up)
        self.pulled_low = 0x00
        self.stuck = 0x00
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        for b in data:
            self.latch = b
            self.writes.append(b)

    def read(self, n: int) -> bytes:
        return bytes([self.latch & ~(self.pulled_low | self.stuck) & 0xFF]) * n


class MCP23017Chip(RegisterChip):
    """MCP23017 with IOCON.BANK=0: IODIR, GPIO and OLAT registers, sequential addressing."""

    model = "mcp23017"

    def __init__(self, *, animate: bool = False) -> None:
        super().__init__(size=0x16)
        self.regs[gpio.MCP_IODIRA] = 0xFF
        self.regs[gpio.MCP_IODIRB] = 0xFF
        self.inputs = 0x0000  # levels on input pins (A in the low byte)
        self.stuck = 0x0000  # output pins stuck low (fault)

    def read_register(self, reg: int) -> int:
        if reg in (gpio.MCP_GPIOA, gpio.MCP_GPIOB):
            shift = 0 if reg == gpio.MCP_GPIOA else 8
            iodir = self.regs[gpio.MCP_IODIRA if shift == 0 else gpio.MCP_IODIRB]
            olat = self.regs[gpio.MCP_OLATA if shift == 0 else gpio.MCP_OLATB]
            pins = (olat & ~iodir) | ((self.inputs >> shift) & iodir)
            return pins & ~(self.stuck >> shift) & 0xFF
        return self.regs[reg]

    def write_register(self, reg: int, value: int) -> None:
        if reg == gpio.MCP_GPIOA:
            reg = gpio.MCP_OLATA  # writing GPIO writes the output latch (datasheet 3.5.10)
        elif reg == gpio.MCP_GPIOB:
            reg = gpio.MCP_OLATB
        self.regs[reg] = value & 0xFF

    @property
    def olat(self) -> int:
        return self.regs[gpio.MCP_OLATA] | (self.regs[gpio.MCP_OLATB] << 8)


def _sht4x(*, animate: bool = False) -> SHTChip:
    return SHTChip(animate=animate, variant="sht4x")


CHIP_MODELS: dict[str, Callable[..., SimChip]] = {
    "bme280": BME280Chip,
    "sht3x": SHTChip,
    "sht4x": _sht4x,
    "ads1115": ADS1115Chip,
    "pcf8574": PCF8574Chip,
    "mcp23017": MCP23017Chip,
}
