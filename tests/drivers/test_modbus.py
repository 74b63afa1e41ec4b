"""Modbus RTU against a pymodbus slave on a real pty: data types, orders, coalescing,
exceptions, CRC errors, shared line, writes, and unplug/replug."""

from __future__ import annotations

import math
import struct

import pytest

from drivers.base import ActionError, DriverError, Quality, ReadTimeoutError
from drivers.bus import BusManager
from drivers.modbus import (
    ModbusConfig,
    ModbusDriver,
    ModbusExceptionError,
    ModbusPoint,
    ModbusWriter,
    ModbusWriterConfig,
    decode_value,
    encode_value,
    plan_reads,
)
from gatewayd_sim.hw.serial import ModbusSlaveSim
from tests.drivers.conftest import wait_for


def words(fmt: str, value: object, byte_order: str = "big", word_order: str = "big") -> list[int]:
    data = struct.pack(">" + fmt, value)
    ws = [int.from_bytes(data[i:i + 2], byte_order) for i in range(0, len(data), 2)]  # type: ignore[arg-type]
    return ws if word_order == "big" else ws[::-1]


def cfg(sim: ModbusSlaveSim, points: dict[str, ModbusPoint], unit: int = 1, **kw: object) -> ModbusConfig:
    kw.setdefault("request_timeout", 0.3)
    return ModbusConfig(port=sim.path, baudrate=19200, unit=unit, points=points,
                        **kw)  # type: ignore[arg-type]


CASES = [
    ("int16", "h", -1234), ("uint16", "H", 54321), ("int32", "i", -123456789),
    ("uint32", "I", 3456789012), ("float32", "f", 21.5), ("int64", "q", -(2**40) - 7),
    ("uint64", "Q", 2**63 + 11), ("float64", "d", -1.0e-3),
]


@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("word_order", ["big", "little"])
async def test_every_type_and_order_over_pty(modbus_sim: ModbusSlaveSim, buses: BusManager,
                                             byte_order: str, word_order: str) -> None:
    points, addr = {}, 0
    for typ, fmt, value in CASES:
        modbus_sim.set_values(1, "holding", addr, words(fmt, value, byte_order, word_order))
        points[typ] = ModbusPoint(address=addr, type=typ, byte_order=byte_order,  # type: ignore[arg-type]
                                  word_order=word_order)  # type: ignore[arg-type]
        addr += struct.calcsize(fmt) // 2
    drv = ModbusDriver("meter", cfg(modbus_sim, points), buses)
    got = {r.point: r.value for r in await drv.read()}
    for typ, _, value in CASES:
        assert got[typ] == pytest.approx(value), typ
    assert len(drv.blocks) == 1  # all contiguous: one request
    assert drv.stats()["requests"] == 1


async def test_coalescing_functions_gaps_and_limits(modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    modbus_sim.set_values(1, "input", 10, [100, 200, 0, 0, 0, 300])
    modbus_sim.set_values(1, "coil", 3, [True, False, True])
    modbus_sim.set_values(1, "discrete", 0, [True])
    points = {
        "a": ModbusPoint(address=10, function="input", scale=0.1),
        "b": ModbusPoint(address=11, function="input", offset=-200),
        "c": ModbusPoint(address=15, function="input"),
        "k3": ModbusPoint(address=3, function="coil", type="bool"),
        "k5": ModbusPoint(address=5, function="coil", type="bool"),
        "d0": ModbusPoint(address=0, function="discrete", type="bool"),
    }
    drv = ModbusDriver("m", cfg(modbus_sim, points, max_gap=2), buses)
    # coils 3..5 (gap 1), discrete 0, input 10..11, input 15 (gap 3 > max_gap 2)
    assert [(b.fc, b.address, b.count) for b in drv.blocks] == [(1, 3, 3), (2, 0, 1), (4, 10, 2), (4, 15, 1)]
    got = {r.point: r.value for r in await drv.read()}
    assert got == {"a": pytest.approx(10.0), "b": 0.0, "c": 300, "k3": True, "k5": True, "d0": True}
    assert drv.stats()["requests"] == 4


async def test_inline_decoding_gives_decode_values_answers(modbus_sim: ModbusSlaveSim,
                                                          buses: BusManager) -> None:
    """The driver decodes plain 16-bit registers and bits inline (no per-point call); its
    readings are the ones decode_value gives, value, type and quality, for every kind."""
    regs = [0x8001, 65535, *words("f", math.nan), 0x0102, 7]
    modbus_sim.set_values(1, "holding", 0, regs)
    modbus_sim.set_values(1, "coil", 0, [True, False])
    points = {
        "u": ModbusPoint(address=0), "s": ModbusPoint(address=0, type="int16"),
        "s1": ModbusPoint(address=1, type="int16"), "half": ModbusPoint(address=1, scale=0.5),
        "nan": ModbusPoint(address=2, type="float32"),
        "le": ModbusPoint(address=4, byte_order="little"),
        "dec": ModbusPoint(address=5, decimals=0, offset=0.4),
        "k0": ModbusPoint(address=0, function="coil", type="bool"),
        "k1": ModbusPoint(address=1, function="coil", type="bool"),
    }
    drv = ModbusDriver("m", cfg(modbus_sim, points), buses)
    got = {r.point: r for r in await drv.read()}
    coils = [True, False]
    for name, p in points.items():
        raw = coils[p.address:p.address + 1] if p.is_bit else regs[p.address:p.address + p.width]
        want = decode_value(raw, p)
        r = got[name]
        assert (r.value, type(r.value)) == (want, type(want)), name
        assert r.quality == (Quality.BAD if want is None else Quality.GOOD), name
    assert got["u"].value == 32769 and got["s"].value == -32767 and got["s1"].value == -1
    assert got["le"].value == 0x0201 and got["k0"].value is True and got["nan"].value is None


def test_plan_respects_register_limit() -> None:
    points = {f"p{i}": ModbusPoint(address=i * 2, type="uint32") for i in range(100)}
    blocks = plan_reads(points, max_registers=125)
    assert [(b.address, b.count) for b in blocks] == [(0, 124), (124, 76)]
    assert sum(len(b.points) for b in blocks) == 100


async def test_exception_response_is_counted_and_marks_points_bad(
        modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    points = {"ok": ModbusPoint(address=0, function="input"),
              "missing": ModbusPoint(address=1000, function="holding")}  # beyond the slave's map
    drv = ModbusDriver("m", cfg(modbus_sim, points), buses)
    got = {r.point: r for r in await drv.read()}
    assert got["ok"].quality == Quality.GOOD
    assert got["missing"].value is None and got["missing"].quality == Quality.BAD
    assert drv.stats()["exceptions"] == 1
    modbus_sim.exception_code = 6  # server device busy, on every request: the read fails
    with pytest.raises(ModbusExceptionError, match=r"exception 6 \(server device busy\)"):
        await drv.read()
    assert drv.stats()["exceptions"] == 3


async def test_crc_corruption_is_counted_then_recovers(modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    modbus_sim.set_values(1, "holding", 0, [42])
    drv = ModbusDriver("m", cfg(modbus_sim, {"v": ModbusPoint(address=0)}, retries=1), buses)
    modbus_sim.fault = "bad_checksum"
    with pytest.raises(DriverError, match="CRC error"):
        await drv.read()
    assert drv.stats()["crc_errors"] == 2  # the request and its retry
    modbus_sim.fault = "garbage"  # noise before the frame is skipped
    assert [r.value for r in await drv.read()] == [42]
    modbus_sim.fault = "truncate"
    with pytest.raises(ReadTimeoutError):
        await drv.read()
    modbus_sim.fault = "silence"
    with pytest.raises(ReadTimeoutError):
        await drv.read()
    modbus_sim.fault = None
    assert [r.value for r in await drv.read()] == [42]
    stats = drv.stats()
    assert stats["timeouts"] == 4 and stats["crc_errors"] == 2


async def test_two_units_share_one_line(modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    modbus_sim.set_values(1, "holding", 0, [11])
    modbus_sim.set_values(2, "holding", 0, [22])
    d1 = ModbusDriver("u1", cfg(modbus_sim, {"v": ModbusPoint(address=0)}, unit=1), buses)
    d2 = ModbusDriver("u2", cfg(modbus_sim, {"v": ModbusPoint(address=0)}, unit=2), buses)
    import asyncio

    results = await asyncio.gather(*[d.read() for d in (d1, d2) for _ in range(5)])
    assert [r[0].value for r in results] == [11] * 5 + [22] * 5
    assert buses.modbus(modbus_sim.path, **d2.config.serial_settings()) is d1._line()
    assert d1.stats()["requests"] == 5 and d2.stats()["requests"] == 5


async def test_writer_encodes_scales_and_verifies(modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    points = {"setpoint": ModbusPoint(address=20, type="int32", scale=0.01, word_order="little"),
              "pump": ModbusPoint(address=7, function="coil", type="bool"),
              "mode": ModbusPoint(address=30)}
    w = ModbusWriter("plc", ModbusWriterConfig(port=modbus_sim.path, baudrate=19200, unit=1,
                                              points=points, request_timeout=0.3), buses)
    res = await w.apply("write", {"point": "setpoint", "value": -12.34})
    assert res["readback"] == pytest.approx(-12.34)
    assert modbus_sim.get_values(1, "holding", 20, 2) == words("i", -1234, "big", "little")
    await w.apply("pump", {"value": True})
    assert modbus_sim.get_values(1, "coil", 7, 1)[0] is True
    await w.apply("mode", {"value": 3})
    assert modbus_sim.get_values(1, "holding", 30, 1) == [3]
    with pytest.raises(ActionError, match="out of range"):
        await w.apply("mode", {"value": 70000})
    with pytest.raises(ActionError, match="unknown point"):
        await w.apply("write", {"point": "nope", "value": 1})


def test_writer_refuses_read_only_points() -> None:
    with pytest.raises(ValueError, match="read-only"):
        ModbusWriterConfig(port="/dev/null", unit=1, points={"x": ModbusPoint(address=0, function="input")})


async def test_unplugged_port_is_reopened(modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    modbus_sim.set_values(1, "holding", 0, [5])
    drv = ModbusDriver("m", cfg(modbus_sim, {"v": ModbusPoint(address=0)}), buses)
    assert (await drv.read())[0].value == 5
    modbus_sim.unplug()
    with pytest.raises(DriverError):
        await drv.read()
    with pytest.raises(DriverError):
        await drv.read()
    modbus_sim.replug()

    async def back() -> bool:
        try:
            return (await drv.read())[0].value == 5
        except DriverError:
            return False

    await wait_for(back)
    assert drv._line().port.opens == 2


def test_codec_round_trip_and_nan() -> None:
    p = ModbusPoint(address=0, type="float32", byte_order="little")
    assert decode_value(encode_value(1.5, p), p) == 1.5
    assert decode_value(words("f", math.nan), ModbusPoint(address=0, type="float32")) is None
    s = ModbusPoint(address=0, type="string", count=3)
    assert decode_value(encode_value("AB12", s), s) == "AB12"


def test_point_validation() -> None:
    with pytest.raises(ValueError, match="single bit"):
        ModbusPoint(address=0, function="coil", type="float32")
    with pytest.raises(ValueError, match="count"):
        ModbusPoint(address=0, type="string")
    with pytest.raises(ValueError, match="does not match"):
        ModbusPoint(address=0, type="int32", count=1)
    with pytest.raises(ValueError, match="unit"):
        ModbusConfig(port="/dev/x", unit=0, points={"a": ModbusPoint(address=0)})
    with pytest.raises(ValueError, match="at least one register"):
        ModbusConfig(port="/dev/x", unit=1)


async def test_silence_waits_only_what_is_left(modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    """t3.5 is measured from the last byte seen: a port quiet for longer is used at once, and a
    request right after a byte waits the rest of the silence, never a fixed gap on top."""
    import time

    modbus_sim.set_values(1, "holding", 0, [7])
    drv = ModbusDriver("m", cfg(modbus_sim, {"v": ModbusPoint(address=0)}), buses)
    line = drv._line()
    port = line.port
    assert line.silence_s() == pytest.approx(3.5 * 10 / 19200)  # 19200 baud, 8N1: 10 bits a char
    waits: list[float] = []
    real = port.sleep_until

    async def spy(when: float) -> None:
        waits.append(when - time.monotonic())
        await real(when)

    port.sleep_until = spy  # type: ignore[method-assign]
    assert (await drv.read())[0].value == 7  # first request: the line was never busy
    assert waits == []
    assert port.last_rx > 0  # the answer's last byte was seen
    # A long silence (so that a loaded machine cannot pass it unnoticed) from a byte seen now:
    line.silence_s = lambda: 0.2  # type: ignore[method-assign]
    seen = time.monotonic()
    port._protocol.rx_at = seen  # type: ignore[union-attr]
    await drv.read()
    assert len(waits) == 1 and 0 < waits[0] <= 0.2  # only the rest of it
    assert port.last_rx - seen >= 0.2  # the answer came after the silence and the request
    port._protocol.rx_at = time.monotonic() - 1.0  # type: ignore[union-attr]  # quiet for a second
    await drv.read()
    assert len(waits) == 1  # nothing left to wait


async def test_silent_unit_times_out_and_the_line_serves_the_next(
        modbus_sim: ModbusSlaveSim, buses: BusManager) -> None:
    """A unit that never answers costs its timeouts (retried, counted) and nothing more: the
    line answers another unit straight after."""
    modbus_sim.set_values(2, "holding", 0, [22])
    gone = ModbusDriver("gone", cfg(modbus_sim, {"v": ModbusPoint(address=0)}, unit=1,
                                    request_timeout=0.1, retries=2), buses)
    there = ModbusDriver("there", cfg(modbus_sim, {"v": ModbusPoint(address=0)}, unit=2), buses)
    modbus_sim.fault = "silence"
    with pytest.raises(ReadTimeoutError, match=r"no response from unit 1 within 0\.1s"):
        await gone.read()
    assert gone.stats() == {"requests": 3, "responses": 0, "exceptions": 0, "crc_errors": 0,
                            "timeouts": 3}
    modbus_sim.fault = None
    assert [r.value for r in await there.read()] == [22]


def test_frame_end_from_length() -> None:
    """The answer's end comes from its function code and byte count; garbage before it goes."""
    from drivers.modbus import _frame_end

    ready = _frame_end(3, 3)
    buf = bytearray(b"\x00\xff\x03")  # noise, then unit 3
    assert ready(buf) == 0 and buf == bytearray(b"\x03")
    buf += b"\x03\x04\x00\x01\x00\x02"  # fc 3, 4 data bytes: 9 bytes with the CRC
    assert ready(buf) == 0
    buf += b"\xaa\xbb\xcc"  # CRC (wrong, checked later) and the start of something else
    assert ready(buf) == 9
    assert _frame_end(3, 3)(bytearray(b"\x03\x83\x02\x00\x00")) == 5  # exception: 5 bytes
    assert _frame_end(3, 6)(bytearray(b"\x03\x06\x00\x01\x00\x02\x00")) == 0  # write echo: 8
    assert _frame_end(3, 6)(bytearray(b"\x03\x06\x00\x01\x00\x02\x00\x00")) == 8
