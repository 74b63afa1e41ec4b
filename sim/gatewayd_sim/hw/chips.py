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


# standby time between normal-mode measurements, config bits 7:5 (datasheet table 27), seconds
_BME_T_SB_S = (0.0005, 0.0625, 0.125, 0.25, 0.5, 1.0, 0.010, 0.020)
_BME_CATCH_UP = 200  # normal-mode measurements replayed at most (the filter has settled by then)


class BME280Chip(RegisterChip):
    """BME280 (datasheet BST-BME280-DS002): chip id, calibration NVM, soft reset; sleep, forced
    and normal mode with datasheet timing; the IIR filter on temperature and pressure; result
    resolution per oversampling and filter (section 3.4.3/3.5); writes taken as address/data
    pairs (section 6.2.1: no auto-increment on writes), reads auto-increment."""

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
        self._iir: list[float] | None = None  # filter memory (raw t, raw p); None after reset
        self._forced_done_at: float | None = None  # a forced measurement in progress ends then
        self._normal_start = 0.0
        self._normal_done = 0  # normal-mode measurements already put in the data registers

    # -- the I2C side ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Address/data pairs; a trailing lone byte only sets the read pointer."""
        for i in range(0, len(data) - 1, 2):
            self.pointer = data[i]
            self.write_register(data[i], data[i + 1])
        if len(data) % 2:
            self.pointer = data[-1]

    def physical(self) -> tuple[float, float, float]:
        if not self.animate:
            return self.temperature_c, self.pressure_hpa, self.humidity_pct
        return (self.temperature_c + 2.0 * _wave(600), self.pressure_hpa + 1.5 * _wave(900, 1.0),
                min(100.0, max(0.0, self.humidity_pct + 5.0 * _wave(700, 2.0))))

    @property
    def mode(self) -> int:
        return self.regs[bme.REG_CTRL_MEAS] & 0b11

    def _oversampling(self) -> tuple[int, int, int]:
        factor = {v: k for k, v in bme.OVERSAMPLING.items()}
        meas = self.regs[bme.REG_CTRL_MEAS]
        fields = ((meas >> 5) & 0x07, (meas >> 2) & 0x07, self._ctrl_hum_active)
        osrs_t, osrs_p, osrs_h = (factor.get(min(f, 5), 16) for f in fields)
        return osrs_t, osrs_p, osrs_h

    def _t_measure_s(self) -> float:
        return bme.measurement_time_s(*self._oversampling())

    def _settle(self) -> None:
        now = time.monotonic()
        if self._forced_done_at is not None and now >= self._forced_done_at:
            self._forced_done_at = None
            self._measure()
            self.regs[bme.REG_CTRL_MEAS] &= 0b1111_1100  # forced mode returns to sleep
        elif self.mode == 0b11:
            t_meas = self._t_measure_s()
            period = t_meas + _BME_T_SB_S[self.regs[bme.REG_CONFIG] >> 5]
            elapsed = now - self._normal_start - t_meas
            done = int(elapsed // period) + 1 if elapsed >= 0 else 0
            for _ in range(max(0, min(done - self._normal_done, _BME_CATCH_UP))):
                self._measure()
            self._normal_done = done

    def _measuring(self) -> bool:
        now = time.monotonic()
        if self._forced_done_at is not None:
            return True
        if self.mode == 0b11:
            t_meas = self._t_measure_s()
            period = t_meas + _BME_T_SB_S[self.regs[bme.REG_CONFIG] >> 5]
            return (now - self._normal_start) % period < t_meas
        return False

    def read_register(self, reg: int) -> int:
        self._settle()
        if reg == bme.REG_STATUS:
            return bme.STATUS_MEASURING if self._measuring() else 0
        return self.regs[reg]

    def write_register(self, reg: int, value: int) -> None:
        self._settle()
        if reg == bme.REG_RESET:
            if value == bme.RESET_WORD:
                self._reset()
            return
        if reg == bme.REG_CTRL_HUM:
            self.regs[reg] = value & 0x07
        elif reg == bme.REG_CTRL_MEAS:
            was = self.mode
            self.regs[reg] = value
            self._ctrl_hum_active = self.regs[bme.REG_CTRL_HUM]
            if value & 0b11 in (0b01, 0b10) and self._forced_done_at is None:
                self._forced_done_at = time.monotonic() + self._t_measure_s()
            elif value & 0b11 == 0b11 and was != 0b11:
                self._normal_start = time.monotonic()  # the first cycle starts at once
                self._normal_done = 0
        elif reg == bme.REG_CONFIG:
            if self.mode != 0b11:  # "writes to config in normal mode may be ignored" (5.4.6)
                self.regs[reg] = value & 0b1111_1101
        # calibration, id, status and data registers are read-only

    # -- one measurement -------------------------------------------------------------------------

    def _measure(self) -> None:
        """Sample, filter, quantise and latch one measurement into the data registers."""
        osrs_t, osrs_p, osrs_h = self._oversampling()
        adc_t, adc_p, adc_h = bme280_raw(*self.physical(), self.calibration)
        coefficient = (1, 2, 4, 8, 16, 16, 16, 16)[(self.regs[bme.REG_CONFIG] >> 2) & 0x07]
        if coefficient > 1:
            if self._iir is None:
                self._iir = [float(adc_t), float(adc_p)]
            else:  # datasheet 3.4.4: (old * (c - 1) + new) / c
                self._iir = [(old * (coefficient - 1) + new) / coefficient
                             for old, new in zip(self._iir, (adc_t, adc_p), strict=True)]
            adc_t, adc_p = (round(x) for x in self._iir)
        else:
            self._iir = [float(adc_t), float(adc_p)]

        def resolution_mask(osrs: int) -> int:
            bits = 20 if coefficient > 1 else 15 + osrs.bit_length()  # x1: 16 bits ... x16: 20
            return ((1 << bits) - 1) << (20 - bits)

        adc_t = adc_t & resolution_mask(osrs_t) if osrs_t else bme.SKIPPED_20
        adc_p = adc_p & resolution_mask(osrs_p) if osrs_p else bme.SKIPPED_20
        if not osrs_h:
            adc_h = bme.SKIPPED_16
        self.regs[bme.REG_DATA:bme.REG_DATA + 8] = bytes([
            adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
            adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4,
            adc_h >> 8, adc_h & 0xFF])
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


# SHT3x periodic mode: command -> (measurements per second, measurement time at that repeatability)
_SHT3X_PERIODIC = {
    0x2032: (0.5, 0.0155), 0x2024: (0.5, 0.0065), 0x202F: (0.5, 0.0045),
    0x2130: (1.0, 0.0155), 0x2126: (1.0, 0.0065), 0x212D: (1.0, 0.0045),
    0x2236: (2.0, 0.0155), 0x2220: (2.0, 0.0065), 0x222B: (2.0, 0.0045),
    0x2334: (4.0, 0.0155), 0x2322: (4.0, 0.0065), 0x2329: (4.0, 0.0045),
    0x2737: (10.0, 0.0155), 0x2721: (10.0, 0.0065), 0x272A: (10.0, 0.0045),
    0x2B32: (4.0, 0.0155),  # ART: accelerated response time, 4 Hz
}
# single shot: command -> (measurement time, clock stretching)
_SHT3X_SINGLE = {0x2400: (0.0155, False), 0x240B: (0.0065, False), 0x2416: (0.0045, False),
                 0x2C06: (0.0155, True), 0x2C0D: (0.0065, True), 0x2C10: (0.0045, True)}
_SHT3X_STATUS_AFTER_RESET = 0x8010  # alert pending (bit 15), system reset detected (bit 4)
_SHT3X_STATUS_HEATER = 0x2000
_SHT3X_STATUS_COMMAND_FAILED = 0x0002
# SHT4x: command -> (measurement time incl. a heater pulse, heater power or 0)
_SHT4X_MEASURE = {0xFD: (0.0083, 0), 0xF6: (0.0045, 0), 0xE0: (0.0017, 0),
                  0x39: (1.1, 200), 0x32: (0.11, 200), 0x2F: (1.1, 110), 0x24: (0.11, 110),
                  0x1E: (1.1, 20), 0x15: (0.11, 20)}


class SHTChip(SimChip):
    """SHT3x or SHT4x with the datasheets' command sets and a CRC-8 on every word.

    SHT3x: single shot (with and without clock stretching), periodic mode at 0.5-10 mps with
    fetch (0xE000), ART (0x2B32), break (0x3093), soft reset (0x30A2), heater on/off
    (0x306D/0x3066), status (0xF32D) and clear status (0x3041), serial number (0x3780). In
    periodic mode only fetch, break and soft reset are taken; other commands are NACKed and the
    status' "command failed" bit is set. The alert-limit commands are not modelled.
    SHT4x: the three precisions, the six heater commands (with a measurement after the pulse),
    serial number (0x89) and soft reset (0x94).

    A read before the result is ready is NACKed (no clock stretching), except after a
    clock-stretching single-shot command, where the read waits for the result.
    The heater warms the sensor by `heater_rise_c`. `corrupt_crc` (fault switch) flips the CRC
    bytes of the next responses.
    """

    model = "sht3x"

    def __init__(self, *, animate: bool = False, variant: str = "sht3x") -> None:
        super().__init__()
        self.variant = variant
        self.animate = animate
        self.temperature_c = 22.0
        self.humidity_pct = 50.0
        self.heater_rise_c = 3.0
        self.corrupt_crc = False
        self.serial = 0x1A2B3C4D
        self.measurements = 0
        self._out: bytes | None = None
        self._ready_at = 0.0
        self._stretch = False
        self._soft_reset()

    def _soft_reset(self) -> None:
        self.status = _SHT3X_STATUS_AFTER_RESET
        self.heater = False
        self.periodic: tuple[float, float] | None = None  # (measurements/s, duration) or idle
        self._periodic_start = 0.0
        self._periodic_fetched = 0
        self._out = None

    def write(self, data: bytes) -> None:
        if self.variant == "sht4x":
            self._write_sht4x(data)
            return
        if len(data) != 2:
            raise _busy()
        cmd = (data[0] << 8) | data[1]
        if self.periodic is not None and cmd not in (0xE000, 0x3093, 0x30A2):
            self.status |= _SHT3X_STATUS_COMMAND_FAILED
            raise _busy()  # periodic mode takes only fetch, break and reset
        if cmd in _SHT3X_SINGLE:
            duration, self._stretch = _SHT3X_SINGLE[cmd]
            self._measure(duration)
        elif cmd in _SHT3X_PERIODIC:
            self.periodic = _SHT3X_PERIODIC[cmd]
            self._periodic_start = time.monotonic()
            self._periodic_fetched = 0
            self._out = None
        elif cmd == 0xE000:  # fetch data: the latest periodic result, once
            self._fetch()
        elif cmd == 0x3093:  # break: stop periodic mode, back to single shot
            self.periodic = None
            self._out = None
        elif cmd == 0x30A2:  # soft reset
            self._soft_reset()
        elif cmd == 0x306D:
            self.heater = True
        elif cmd == 0x3066:
            self.heater = False
        elif cmd == 0xF32D:  # read status register
            self._respond(self.status | (_SHT3X_STATUS_HEATER if self.heater else 0), None, 0.0)
        elif cmd == 0x3041:  # clear status: alert pending, tracking alerts, reset detected
            self.status &= ~0x8C10 & 0xFFFF
        elif cmd == 0x3780:  # read serial number
            self._respond(self.serial >> 16, self.serial & 0xFFFF, 0.0)
        else:
            self.status |= _SHT3X_STATUS_COMMAND_FAILED
            raise _busy()  # unknown commands are not acknowledged
        if cmd not in (0xF32D,):
            self.status &= ~_SHT3X_STATUS_COMMAND_FAILED & 0xFFFF

    def _write_sht4x(self, data: bytes) -> None:
        if len(data) != 1:
            raise _busy()
        cmd = data[0]
        self._stretch = False
        if cmd in _SHT4X_MEASURE:
            duration, power = _SHT4X_MEASURE[cmd]
            self._measure(duration, heated=power > 0)
        elif cmd == 0x89:
            self._respond(self.serial >> 16, self.serial & 0xFFFF, 0.001)
        elif cmd == 0x94:
            self._out = None
        else:
            raise _busy()

    def _fetch(self) -> None:
        assert self.periodic is not None
        rate, duration = self.periodic
        done = int((time.monotonic() - self._periodic_start - duration) * rate) + 1
        if time.monotonic() - self._periodic_start < duration or done <= self._periodic_fetched:
            self._out = None  # no new data: the read header is NACKed
            return
        self._periodic_fetched = done
        self._measure(0.0)

    def _measure(self, duration_s: float, heated: bool = False) -> None:
        t, h = self.temperature_c, self.humidity_pct
        if self.animate:
            t, h = t + 1.5 * _wave(500), min(100.0, max(0.0, h + 4 * _wave(650, 0.5)))
        if self.heater or heated:
            t += self.heater_rise_c
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
        if self._out is not None and self._stretch:
            time.sleep(max(0.0, self._ready_at - time.monotonic()))  # SCL held low meanwhile
        # without clock stretching the chip NACKs its read header until the result is ready
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


_MCP_IPOLA, _MCP_IPOLB = 0x02, 0x03
_MCP_GPPUA, _MCP_GPPUB = 0x0C, 0x0D


class MCP23017Chip(RegisterChip):
    """MCP23017 with IOCON.BANK=0: IODIR, IPOL, GPPU, GPIO and OLAT, sequential addressing.

    Pins driven from outside are `driven` (a mask) at the levels in `inputs`; setting `inputs`
    drives every pin. An input nothing drives reads high with its GPPU pull-up (100 kOhm) and
    low without (a floating CMOS input; the real level is undefined). IPOL inverts what GPIO
    reports for input pins.
    """

    model = "mcp23017"

    def __init__(self, *, animate: bool = False) -> None:
        super().__init__(size=0x16)
        self.regs[gpio.MCP_IODIRA] = 0xFF
        self.regs[gpio.MCP_IODIRB] = 0xFF
        self._inputs = 0x0000  # levels on driven pins (A in the low byte)
        self.driven = 0x0000  # pins something outside drives; the rest float
        self.stuck = 0x0000  # output pins stuck low (fault)

    @property
    def inputs(self) -> int:
        return self._inputs

    @inputs.setter
    def inputs(self, levels: int) -> None:
        self._inputs = levels & 0xFFFF
        self.driven = 0xFFFF

    def drive(self, pin: int, level: bool | None) -> None:
        """Drive `pin` (0-15) high or low from outside, or release it (None)."""
        bit = 1 << pin
        if level is None:
            self.driven &= ~bit
        else:
            self.driven |= bit
            self._inputs = (self._inputs | bit) if level else (self._inputs & ~bit)

    def _word(self, low_reg: int) -> int:
        return self.regs[low_reg] | (self.regs[low_reg + 1] << 8)

    def pin_levels(self) -> int:
        """The electrical level of all 16 pins."""
        iodir = self._word(gpio.MCP_IODIRA)
        outputs = self._word(gpio.MCP_OLATA) & ~iodir & ~self.stuck
        pullup = self._word(_MCP_GPPUA)
        external = (self._inputs & self.driven) | (pullup & ~self.driven)
        return (outputs | (external & iodir)) & 0xFFFF

    def read_register(self, reg: int) -> int:
        if reg in (gpio.MCP_GPIOA, gpio.MCP_GPIOB):
            shift = 0 if reg == gpio.MCP_GPIOA else 8
            iodir = self._word(gpio.MCP_IODIRA)
            value = self.pin_levels() ^ (self._word(_MCP_IPOLA) & iodir)
            return (value >> shift) & 0xFF
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
