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


def _cmd(sim: SimI2CBus, word: int) -> None:
    sim.transfer(0x44, bytes([word >> 8, word & 0xFF]), 0)


def _status(sim: SimI2CBus) -> int:
    _cmd(sim, 0xF32D)
    return check_words(sim.transfer(0x44, b"", 3))[0]


def test_sht3x_break_is_accepted_idle_and_stops_periodic_mode(sim: SimI2CBus) -> None:
    chip = sim.attach(0x44, SHTChip())
    _cmd(sim, 0x3093)  # break on an idle chip: a driver's reset sends it first
    _cmd(sim, 0x2737)  # periodic, 10 mps, high repeatability
    with pytest.raises(OSError):
        _cmd(sim, 0x2400)  # single shot is refused while periodic
    with pytest.raises(OSError):
        _cmd(sim, 0xF32D)  # and so is the status read
    assert chip.measurements == 0
    _cmd(sim, 0x3093)
    _cmd(sim, 0x2400)  # after the break, single shot is taken again
    assert chip.measurements == 1


def test_sht3x_periodic_fetch_returns_each_result_once(sim: SimI2CBus) -> None:
    import time

    chip = sim.attach(0x44, SHTChip())
    chip.temperature_c = 24.5  # type: ignore[attr-defined]
    _cmd(sim, 0x2737)  # 10 mps
    deadline = time.monotonic() + 5
    while True:
        _cmd(sim, 0xE000)
        try:
            data = sim.transfer(0x44, b"", 6)
            break
        except OSError:  # no new data yet: the read header is NACKed
            assert time.monotonic() < deadline, "periodic mode never produced a result"
            time.sleep(0.01)
    raw_t, raw_h = check_words(data)
    assert convert(raw_t, raw_h, "sht3x")[0] == pytest.approx(24.5, abs=0.01)
    _cmd(sim, 0xE000)  # at once again: that result was fetched already
    with pytest.raises(OSError):
        sim.transfer(0x44, b"", 6)


def test_sht3x_art_mode_and_break(sim: SimI2CBus) -> None:
    chip = sim.attach(0x44, SHTChip())
    _cmd(sim, 0x2B32)
    assert chip.periodic == (4.0, 0.0155)  # type: ignore[attr-defined]
    _cmd(sim, 0x3093)
    assert chip.periodic is None  # type: ignore[attr-defined]
    _cmd(sim, 0x2400)  # single shot works again


def test_sht3x_heater_and_clear_status(sim: SimI2CBus) -> None:
    import time

    chip = sim.attach(0x44, SHTChip())
    assert _status(sim) == 0x8010  # after power-up: alert pending, reset detected
    _cmd(sim, 0x3041)  # clear status
    assert _status(sim) == 0x0000
    _cmd(sim, 0x306D)  # heater on
    assert _status(sim) & 0x2000
    _cmd(sim, 0x2C06)  # single shot with clock stretching: the read waits for the result
    raw_t, _ = check_words(sim.transfer(0x44, b"", 6))
    assert convert(raw_t, 0, "sht3x")[0] == pytest.approx(chip.temperature_c + chip.heater_rise_c,  # type: ignore[attr-defined]
                                                          abs=0.01)
    _cmd(sim, 0x3066)  # heater off
    assert not _status(sim) & 0x2000
    _cmd(sim, 0x30A2)  # soft reset: "reset detected" again
    time.sleep(0.002)
    assert _status(sim) == 0x8010


async def test_driver_opens_a_chip_left_in_periodic_mode(buses: BusManager, sim: SimI2CBus) -> None:
    # another program (or an earlier firmware) left the chip measuring periodically: only a
    # break brings it back to single shot, which the driver sends before identifying it
    chip = sim.attach(0x44, SHTChip())
    chip.temperature_c = 19.25  # type: ignore[attr-defined]
    _cmd(sim, 0x2130)
    drv = SHT("room", SHTConfig(bus=f"sim:{sim.name}"), buses)
    await drv.open()
    got = {r.point: r.value for r in await drv.read()}
    assert got["temperature_c"] == pytest.approx(19.25, abs=0.01)


def test_sht4x_heater_commands_measure_after_the_pulse(sim: SimI2CBus) -> None:
    chip = sim.attach(0x44, SHTChip(variant="sht4x"))
    sim.transfer(0x44, b"\x15", 0)  # 20 mW for 0.1 s, then a high-precision measurement
    with pytest.raises(OSError):
        sim.transfer(0x44, b"", 6)  # still heating
    assert chip.measurements == 1
