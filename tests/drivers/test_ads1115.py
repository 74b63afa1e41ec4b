"""ADS1115: config word, scaling, 4-20 mA open-loop quality, and conversions on the model."""

from __future__ import annotations

import dataclasses

import pytest

from drivers import ads1115 as ads
from drivers.base import DeviceNotFoundError, DriverError, Quality
from drivers.bus import BusManager
from gatewayd_sim.hw.chips import ADS1115Chip
from gatewayd_sim.hw.i2c import SimI2CBus

LOOP = ads.ADCPoint(channel="0", gain_v=6.144, shunt_ohms=250.0, in_min=4.0, in_max=20.0,
                    out_min=0.0, out_max=10.0, valid_min=3.8, valid_max=20.5)


def test_config_word_fields() -> None:
    # AIN1-GND (MUX 101), +-1.024 V (PGA 011), 860 SPS (DR 111), single shot, comparator off
    word = ads.ADCPoint(channel="1", gain_v=1.024, rate_sps=860).config_word()
    assert word == 0b1_101_011_1_111_00011
    assert ads.ADCPoint().config_word() == 0xC583  # AIN0, defaults: 0x8583 with MUX=100


def test_scaling_and_current_loop() -> None:
    # 12 mA across 250 ohm is 3.0 V: code 3.0 / 6.144 * 32768 = 16000
    x = LOOP.input_value(16000)
    assert x == pytest.approx(12.0)
    assert LOOP.scale(x) == pytest.approx(5.0)
    assert LOOP.input_value(0xFFFF) == pytest.approx(-6.144 / 32768 / 250 * 1000)
    assert not LOOP.valid(3.5) and LOOP.valid(4.0) and not LOOP.valid(21.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="gain_v"):
        ads.ADCPoint(gain_v=5.0)
    with pytest.raises(ValueError, match="channel"):
        ads.ADCPoint(channel="4")
    with pytest.raises(ValueError, match="rate_sps"):
        ads.ADCPoint(rate_sps=100)


async def test_readings_from_model_with_open_loop(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x49, ADS1115Chip())
    chip.volts = [3.0, 0.5, 2.25, 0.0]  # type: ignore[attr-defined]
    cfg = ads.ADS1115Config(bus=f"sim:{sim.name}", address=0x49, points={
        "pressure_bar": LOOP,
        "diff_v": ads.ADCPoint(channel="2-3", gain_v=4.096, rate_sps=860),
        "ain1_v": ads.ADCPoint(channel="1", gain_v=0.512),
    })
    drv = ads.ADS1115("tank", cfg, buses)
    await drv.open()
    got = {r.point: r for r in await drv.read()}
    assert got["pressure_bar"].value == pytest.approx(5.0, abs=0.002)
    assert got["pressure_bar"].quality == Quality.GOOD
    assert got["diff_v"].value == pytest.approx(2.25, abs=0.0002)
    assert got["ain1_v"].value == pytest.approx(0.5, abs=0.0001)
    assert chip.conversions == 3  # type: ignore[attr-defined]
    chip.volts[0] = 0.5  # type: ignore[attr-defined]  # 2 mA: the loop is open
    bad = {r.point: r for r in await drv.read()}["pressure_bar"]
    assert bad.value is None and bad.quality == Quality.BAD


async def test_saturation_clamps_to_full_scale(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x48, ADS1115Chip())
    chip.volts = [3.3, 0, 0, 0]  # type: ignore[attr-defined]
    drv = ads.ADS1115("a", ads.ADS1115Config(bus=f"sim:{sim.name}"), buses)
    await drv.open()
    assert await drv.convert(ads.ADCPoint(gain_v=2.048)) == 0x7FFF


async def test_chip_that_lost_its_config_is_an_error(buses: BusManager, sim: SimI2CBus) -> None:
    class Forgetful(ADS1115Chip):
        def write(self, data: bytes) -> None:
            super().write(data[:1])  # drops the value: config stays at its default

    sim.attach(0x48, Forgetful())
    drv = ads.ADS1115("a", ads.ADS1115Config(bus=f"sim:{sim.name}",
                                             points={"v": ads.ADCPoint(channel="3")}), buses)
    await drv.open()
    with pytest.raises(DriverError, match="readback"):
        await drv.read()


async def test_open_reports_a_missing_chip(buses: BusManager, sim: SimI2CBus) -> None:
    drv = ads.ADS1115("a", ads.ADS1115Config(bus=f"sim:{sim.name}", address=0x4B), buses)
    sim.ensure(0x4B, "ads1115").vanish()
    with pytest.raises(DeviceNotFoundError, match="no ADS1115 answering at 0x4b"):
        await drv.open()


async def test_exactly_4ma_reads_zero_not_negative_zero(buses: BusManager, sim: SimI2CBus) -> None:
    # 4 mA across 250 ohm is 1.0 V; at +-6.144 V the code is 5333 (0.99994 V, 3.99976 mA), which
    # scales to -0.00015 on 0..10 and at 2 decimals rounds to -0.0: "minus zero" on a display
    chip = sim.attach(0x48, ADS1115Chip())
    chip.volts = [1.0, 0.0, 0.0, 0.0]  # type: ignore[attr-defined]
    drv = ads.ADS1115("tank", ads.ADS1115Config(bus=f"sim:{sim.name}", points={"level": dataclasses.replace(LOOP, decimals=2)}), buses)
    [reading] = await drv.read()
    assert reading.value == 0.0 and str(reading.value) == "0.0"
