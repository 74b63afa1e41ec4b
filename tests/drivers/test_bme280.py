"""BME280: Bosch integer compensation against known triples, and end to end on the fake bus."""

from __future__ import annotations

from dataclasses import replace

import pytest

from drivers import bme280 as bme
from drivers.base import DeviceNotFoundError
from drivers.bus import BusManager
from gatewayd_sim.hw.chips import REAL_CALIBRATION, BME280Chip, bme280_raw, float_h, float_p, float_t
from gatewayd_sim.hw.i2c import SimI2CBus

CAL = REAL_CALIBRATION


def test_datasheet_worked_example_temperature_and_pressure() -> None:
    # Bosch BMP280 datasheet, section 3.12: adc_T=519888, adc_P=415148 with these constants
    t, t_fine = bme.compensate_t(519888, CAL)
    assert t == 2508  # 25.08 degC
    assert t_fine == 128422
    ft, ft_fine = float_t(519888, CAL)
    assert ft == pytest.approx(25.08, abs=0.005)
    # the datasheet gives 100653.27 Pa (double precision); the 64-bit integer path lands within
    # its 1/256 Pa steps of that
    assert float_p(415148, ft_fine, CAL) == pytest.approx(100653.27, abs=0.005)
    p = bme.compensate_p(415148, t_fine, CAL)
    assert p == 25767233
    assert p / 256 == pytest.approx(100653.27, abs=0.05)


@pytest.mark.parametrize("adc_t,adc_p,adc_h", [
    (519888, 415148, 30000), (480000, 380000, 24000), (560000, 450000, 36000), (400000, 300000, 20000),
])
def test_integer_compensation_matches_the_double_precision_formulas(
        adc_t: int, adc_p: int, adc_h: int) -> None:
    # the float formulas (datasheet 8.1) are an independent implementation of the same model
    t, t_fine = bme.compensate_t(adc_t, CAL)
    ft, ft_fine = float_t(adc_t, CAL)
    assert t / 100 == pytest.approx(ft, abs=0.01)
    assert bme.compensate_p(adc_p, t_fine, CAL) / 256 == pytest.approx(float_p(adc_p, ft_fine, CAL), abs=0.5)
    assert bme.compensate_h(adc_h, t_fine, CAL) / 1024 == pytest.approx(
        max(0.0, min(100.0, float_h(adc_h, ft_fine, CAL))), abs=0.02)


def test_humidity_is_clamped_to_0_and_100() -> None:
    _, t_fine = bme.compensate_t(519888, CAL)
    assert bme.compensate_h(0, t_fine, CAL) == 0
    assert bme.compensate_h(0xFFFF, t_fine, CAL) / 1024 == 100.0


def test_calibration_block_round_trip() -> None:
    tp, h = bme.encode_calibration(CAL)
    assert len(tp) == bme.CALIB_TP_LEN and len(h) == bme.CALIB_H_LEN
    assert bme.parse_calibration(tp, h) == CAL
    neg = replace(CAL, h4=-300, h5=-7, h6=-12)  # the 12-bit signed fields
    assert bme.parse_calibration(*bme.encode_calibration(neg)) == neg


def test_measurement_time_follows_datasheet_9_1() -> None:
    assert bme.measurement_time_s(1, 1, 1) == pytest.approx(0.0093)  # table 13: 9.3 ms
    assert bme.measurement_time_s(16, 16, 16) == pytest.approx(0.1128)
    assert bme.measurement_time_s(1, 0, 0) == pytest.approx(0.00355)


@pytest.mark.parametrize("t,p,h", [(21.5, 1013.25, 45.0), (-10.0, 950.0, 80.0), (35.2, 1040.0, 12.5)])
async def test_end_to_end_through_fake_bus_recovers_physical_values(
        buses: BusManager, sim: SimI2CBus, t: float, p: float, h: float) -> None:
    chip = sim.attach(0x77, BME280Chip())
    chip.temperature_c, chip.pressure_hpa, chip.humidity_pct = t, p, h
    cfg = bme.BME280Config(bus=f"sim:{sim.name}", address=0x77, oversampling_t=2, oversampling_p=4, filter=4)
    drv = bme.BME280("attic", cfg, buses)
    await drv.open()
    got = {r.point: r.value for r in await drv.read()}
    # datasheet resolution: 0.01 degC, 0.18 Pa (we allow 0.01 hPa), 0.008 %RH (we allow 0.02)
    assert got["temperature_c"] == pytest.approx(t, abs=0.01)
    assert got["pressure_hpa"] == pytest.approx(p, abs=0.01)
    assert got["humidity_pct"] == pytest.approx(h, abs=0.02)
    assert chip.measurements == 1
    # the driver configured the chip as asked: osrs_t=x2 (010), osrs_p=x4 (011), forced
    assert chip.regs[bme.REG_CONFIG] == bme.FILTER[4] << 2
    assert chip.regs[bme.REG_CTRL_HUM] == bme.OVERSAMPLING[1]


async def test_skipped_humidity_is_left_out(buses: BusManager, sim: SimI2CBus) -> None:
    sim.attach(0x76, BME280Chip())
    drv = bme.BME280("x", bme.BME280Config(bus=f"sim:{sim.name}", oversampling_h=0), buses)
    await drv.open()
    assert {r.point for r in await drv.read()} == {"temperature_c", "pressure_hpa"}


async def test_wrong_chip_id_is_reported(buses: BusManager, sim: SimI2CBus) -> None:
    sim.attach(0x76, BME280Chip(address_id=0x58))  # a BMP280
    drv = bme.BME280("x", bme.BME280Config(bus=f"sim:{sim.name}"), buses)
    with pytest.raises(DeviceNotFoundError, match="chip id 0x58"):
        await drv.open()


def test_raw_generator_inverts_the_model() -> None:
    adc_t, adc_p, adc_h = bme280_raw(25.08, 1006.5327, 50.0)
    assert float_t(adc_t, CAL)[0] == pytest.approx(25.08, abs=0.0001)
    _, t_fine = bme.compensate_t(adc_t, CAL)
    assert bme.compensate_p(adc_p, t_fine, CAL) / 256 == pytest.approx(100653.27, abs=0.5)
    assert bme.compensate_h(adc_h, t_fine, CAL) / 1024 == pytest.approx(50.0, abs=0.01)


def test_config_rejects_bad_address() -> None:
    with pytest.raises(ValueError, match="0x76 or 0x77"):
        bme.BME280Config(address=0x40)


def _xfer(sim: SimI2CBus, addr: int, write: bytes, n: int = 0) -> bytes:
    return sim.transfer(addr, write, n)


def _wait_status_idle(sim: SimI2CBus, addr: int) -> None:
    import time

    deadline = time.monotonic() + 5
    while _xfer(sim, addr, bytes([bme.REG_STATUS]), 1)[0] & bme.STATUS_MEASURING:
        assert time.monotonic() < deadline, "measurement never completed"
        time.sleep(0.001)


def _raw(sim: SimI2CBus, addr: int = 0x76) -> tuple[int, int, int]:
    return bme.split_raw(_xfer(sim, addr, bytes([bme.REG_DATA]), bme.DATA_LEN))


async def test_iir_filter_16_takes_a_step_one_sixteenth_at_a_time(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x76, BME280Chip())
    chip.temperature_c = 20.0
    drv = bme.BME280("attic", bme.BME280Config(bus=f"sim:{sim.name}", filter=16), buses)
    await drv.open()
    first = {r.point: r.value for r in await drv.read()}
    assert first["temperature_c"] == pytest.approx(20.0, abs=0.01)  # the filter starts at the input
    chip.temperature_c = 30.0
    step = {r.point: r.value for r in await drv.read()}
    assert step["temperature_c"] == pytest.approx(20.625, abs=0.02)  # 20 + 10/16
    again = {r.point: r.value for r in await drv.read()}
    assert again["temperature_c"] == pytest.approx(20 + 10 * (1 - (15 / 16) ** 2), abs=0.02)


async def test_without_filter_a_step_reads_at_once(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x76, BME280Chip())
    drv = bme.BME280("attic", bme.BME280Config(bus=f"sim:{sim.name}", oversampling_t=16), buses)
    await drv.read()
    chip.temperature_c = 30.0
    assert (await drv.read())[0].value == pytest.approx(30.0, abs=0.01)


def test_normal_mode_measures_cyclically(sim: SimI2CBus) -> None:
    chip = sim.attach(0x76, BME280Chip())
    chip.temperature_c = 25.0
    _xfer(sim, 0x76, bytes([bme.REG_CONFIG, 0b000_000_00]))  # t_sb 0.5 ms, filter off
    _xfer(sim, 0x76, bytes([bme.REG_CTRL_HUM, 1]))
    _xfer(sim, 0x76, bytes([bme.REG_CTRL_MEAS, 0b101_101_11]))  # x16, x16, normal mode
    import time

    deadline = time.monotonic() + 5
    while _raw(sim)[0] == bme.SKIPPED_20:  # the first cycle has not completed yet
        assert time.monotonic() < deadline, "normal mode never produced a result"
        time.sleep(0.005)
    adc_t, adc_p, adc_h = _raw(sim)
    assert float_t(adc_t, CAL)[0] == pytest.approx(25.0, abs=0.01)
    assert adc_p != bme.SKIPPED_20 and adc_h != bme.SKIPPED_16
    # the chip stays in normal mode and keeps measuring: a new temperature shows up unasked
    assert _xfer(sim, 0x76, bytes([bme.REG_CTRL_MEAS]), 1)[0] & 0b11 == 0b11
    chip.temperature_c = 31.0
    while float_t(_raw(sim)[0], CAL)[0] < 30.99:
        assert time.monotonic() < deadline + 5, "normal mode stopped measuring"
        time.sleep(0.005)
    assert chip.measurements >= 2


def test_burst_write_is_address_data_pairs(sim: SimI2CBus) -> None:
    # datasheet 6.2.1: no auto-increment on writes; ctrl_meas and config in one burst is
    # [0xF4, meas, 0xF5, config]
    sim.attach(0x76, BME280Chip())
    _xfer(sim, 0x76, bytes([bme.REG_CTRL_MEAS, 0b001_001_00, bme.REG_CONFIG, 0b101_100_00]))
    assert _xfer(sim, 0x76, bytes([bme.REG_CTRL_MEAS]), 2) == bytes([0b001_001_00, 0b101_100_00])
    # an auto-increment style burst [0xF4, meas, config] loses config: 0xF5 would be read as an
    # address with no data
    sim.attach(0x77, BME280Chip())
    _xfer(sim, 0x77, bytes([bme.REG_CTRL_MEAS, 0b001_001_00, 0b101_100_00]))
    assert _xfer(sim, 0x77, bytes([bme.REG_CTRL_MEAS]), 2) == bytes([0b001_001_00, 0])


@pytest.mark.parametrize("osrs,filt,bits", [(1, 0, 16), (2, 0, 17), (8, 0, 19), (16, 0, 20), (1, 4, 20)])
def test_result_resolution_follows_oversampling_and_filter(
        sim: SimI2CBus, osrs: int, filt: int, bits: int) -> None:
    # datasheet 3.4.3/3.5: without the filter, 16 + (osrs - 1) bits; with the filter, 20 bits
    chip = sim.attach(0x76, BME280Chip())
    field = bme.OVERSAMPLING[osrs]
    zero_mask = (1 << (20 - bits)) - 1
    nonzero = 0
    for i in range(8):
        chip.temperature_c = 21.0 + i * 0.37
        chip.pressure_hpa = 1000.0 + i * 1.13
        _xfer(sim, 0x76, bytes([bme.REG_RESET, bme.RESET_WORD]))
        _xfer(sim, 0x76, bytes([bme.REG_CONFIG, bme.FILTER[filt] << 2]))
        _xfer(sim, 0x76, bytes([bme.REG_CTRL_MEAS, (field << 5) | (field << 2) | bme.MODE_FORCED]))
        _wait_status_idle(sim, 0x76)
        adc_t, adc_p, _ = _raw(sim)
        assert adc_t & zero_mask == 0 and adc_p & zero_mask == 0, (hex(adc_t), hex(adc_p))
        nonzero |= (adc_t | adc_p) & 0x0F
    if bits == 20:
        assert nonzero  # full resolution does use the low bits
    if bits == 16:
        assert _xfer(sim, 0x76, bytes([bme.REG_DATA + 2]), 1)[0] & 0xF0 == 0  # press_xlsb 7:4
        assert _xfer(sim, 0x76, bytes([bme.REG_DATA + 5]), 1)[0] & 0xF0 == 0  # temp_xlsb 7:4


def test_config_writes_are_ignored_in_normal_mode(sim: SimI2CBus) -> None:
    sim.attach(0x76, BME280Chip())
    _xfer(sim, 0x76, bytes([bme.REG_CONFIG, bme.FILTER[2] << 2]))
    _xfer(sim, 0x76, bytes([bme.REG_CTRL_MEAS, 0b001_001_11]))
    _xfer(sim, 0x76, bytes([bme.REG_CONFIG, bme.FILTER[16] << 2]))
    assert _xfer(sim, 0x76, bytes([bme.REG_CONFIG]), 1)[0] == bme.FILTER[2] << 2
