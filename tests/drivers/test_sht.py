"""SHT3x/SHT4x: CRC vectors, conversions, and reads through the emulated chip with CRC faults."""

from __future__ import annotations

import pytest

from drivers.base import DeviceNotFoundError, DriverError
from drivers.bus import BusManager
from drivers.sht import SHT, SHTConfig, check_words, convert, crc8
from gatewayd_sim.hw.chips import SHTChip
from gatewayd_sim.hw.i2c import SimI2CBus


def test_crc_datasheet_vector() -> None:
    assert crc8(b"\xbe\xef") == 0x92  # SHT3x datasheet 4.12
    assert crc8(b"\x00\x00") == 0x81


def test_check_words_rejects_bad_crc_and_odd_lengths() -> None:
    assert check_words(b"\xbe\xef\x92\x00\x00\x81") == [0xBEEF, 0x0000]
    with pytest.raises(ValueError, match="CRC mismatch on word 1"):
        check_words(b"\xbe\xef\x92\x00\x00\x80")
    with pytest.raises(ValueError, match="triplets"):
        check_words(b"\xbe\xef")


def test_conversion_formulas() -> None:
    assert convert(0, 0, "sht3x") == (-45.0, 0.0)
    assert convert(0xFFFF, 0xFFFF, "sht3x") == (130.0, 100.0)
    assert convert(0x6666, 0x8000, "sht3x") == (pytest.approx(25.0, abs=0.01), pytest.approx(50.0, abs=0.01))
    assert convert(0, 0, "sht4x")[1] == 0.0  # -6 %RH clamps at 0
    assert convert(0, 0xFFFF, "sht4x")[1] == 100.0  # 119 %RH clamps at 100


@pytest.mark.parametrize("variant", ["sht3x", "sht4x"])
async def test_read_through_emulated_chip(buses: BusManager, sim: SimI2CBus, variant: str) -> None:
    chip = sim.attach(0x44, SHTChip(variant=variant))
    chip.temperature_c, chip.humidity_pct = 23.45, 61.2  # type: ignore[attr-defined]
    drv = SHT("room", SHTConfig(bus=f"sim:{sim.name}", variant=variant), buses)  # type: ignore[arg-type]
    await drv.open()
    got = {r.point: r.value for r in await drv.read()}
    assert got["temperature_c"] == pytest.approx(23.45, abs=0.01)
    assert got["humidity_pct"] == pytest.approx(61.2, abs=0.01)


async def test_bad_crc_is_a_counted_read_error_and_recovers(buses: BusManager, sim: SimI2CBus) -> None:
    chip = sim.attach(0x45, SHTChip())
    drv = SHT("room", SHTConfig(bus=f"sim:{sim.name}", address=0x45), buses)
    await drv.open()
    chip.corrupt_crc = True  # type: ignore[attr-defined]
    for n in (1, 2):
        with pytest.raises(DriverError, match="CRC mismatch"):
            await drv.read()
        assert drv.crc_errors == n
    chip.corrupt_crc = False  # type: ignore[attr-defined]
    assert len(await drv.read()) == 2
    assert drv.crc_errors == 2


async def test_reading_too_early_is_nacked_by_the_model(sim: SimI2CBus) -> None:
    chip = sim.attach(0x44, SHTChip())
    sim.transfer(0x44, b"\x24\x00", 0)
    with pytest.raises(OSError):
        sim.transfer(0x44, b"", 6)  # 15 ms measurement still running: read header NACKed
    assert chip.measurements == 1


@pytest.mark.parametrize("variant", ["sht3x", "sht4x"])
async def test_open_identifies_the_chip(buses: BusManager, sim: SimI2CBus, variant: str) -> None:
    chip = sim.attach(0x44, SHTChip(variant=variant))
    drv = SHT("room", SHTConfig(bus=f"sim:{sim.name}", variant=variant), buses)  # type: ignore[arg-type]
    await drv.open()
    chip.vanish()
    with pytest.raises(DeviceNotFoundError, match=f"no {variant.upper()} answering at 0x44"):
        await drv.open()
