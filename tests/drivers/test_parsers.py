"""NMEA and line parsing, with hypothesis fuzzing: nothing but DriverError may escape any parser
(NMEA, line regex, Modbus decode)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DriverError
from drivers.line import LineField, parse_line
from drivers.modbus import ModbusLine, ModbusPoint, decode_value
from drivers.nmea import parse_sentence
from gatewayd_sim.hw.serial import nmea_sentence

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"


def test_gga_reference_sentence() -> None:
    kind, v = parse_sentence(GGA)
    assert kind == "GGA"
    assert v == {"fix_quality": 1, "satellites": 8, "lat": pytest.approx(48.1173),
                 "long": pytest.approx(11.516667, abs=1e-6), "alt": 545.4}


def test_rmc_reference_sentence_and_southern_western_hemisphere() -> None:
    assert parse_sentence(RMC) == ("RMC", {"valid": True, "lat": pytest.approx(48.1173),
                                           "long": pytest.approx(11.516667, abs=1e-6)})
    s = nmea_sentence("GNGGA,000000,3352.128,S,15112.558,W,2,12,0.7,10.0,M,,M,,")
    _, v = parse_sentence(s)
    assert v["lat"] == pytest.approx(-33.8688) and v["long"] == pytest.approx(-151.2093)


def test_garbage_before_dollar_is_ignored_and_checksums_are_checked() -> None:
    assert parse_sentence(b"\x00\xff#@" + GGA)[0] == "GGA"
    with pytest.raises(DriverError, match="checksum mismatch"):
        parse_sentence(GGA.replace(b"*47", b"*48"))
    with pytest.raises(DriverError, match="missing checksum"):
        parse_sentence(GGA[:40])
    with pytest.raises(DriverError, match="out of range"):
        parse_sentence(nmea_sentence("GPGGA,1,4899.0,N,01131.000,E,1,08,0.9,5,M,,M,,"))


def test_no_fix_sentence_parses_with_empty_fields() -> None:
    _, v = parse_sentence(nmea_sentence("GPGGA,123519,,,,,0,00,,,M,,M,,"))
    assert v == {"fix_quality": 0, "satellites": 0, "lat": None, "long": None, "alt": None}


LINE_RX = re.compile(r"T=(?P<temperature_c>-?\d+(?:\.\d+)?) H=(?P<humidity_pct>\d+(?:\.\d+)?)"
                     r"(?: ST=(?P<ok>\w+))?")
FIELDS = {"humidity_pct": LineField(scale=0.01, point="humidity_frac"), "ok": LineField(type="bool")}


def test_line_parsing_types_scale_rename_and_optional_groups() -> None:
    assert parse_line(b"T=21.50 H=45.0 ST=OK\r\n", LINE_RX, FIELDS, "ascii") == {
        "temperature_c": 21.5, "humidity_frac": pytest.approx(0.45), "ok": True}
    assert parse_line(b"T=-3 H=10", LINE_RX, FIELDS, "ascii") == {
        "temperature_c": -3.0, "humidity_frac": pytest.approx(0.1)}
    with pytest.raises(DriverError, match="does not match"):
        parse_line(b"ERR 17", LINE_RX, FIELDS, "ascii")
    rx = re.compile(r"N=(?P<n>\S+)")
    with pytest.raises(DriverError, match="not an int"):
        parse_line(b"N=1.5", rx, {"n": LineField(type="int")}, "ascii")
    with pytest.raises(DriverError, match="not a finite number"):
        parse_line(b"N=nan", rx, {}, "ascii")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_nmea_bytes(data: bytes) -> None:
    try:
        parse_sentence(data)
    except DriverError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet="0123456789.,-NSEWAVM$*GPRMCGA ", max_size=14), min_size=1, max_size=16))
def test_fuzz_nmea_structured(fields: list[str]) -> None:
    # sentences with valid checksums but arbitrary field contents reach the field parsers
    for head in ("GPGGA", "GPRMC"):
        body = ",".join([head, *fields]).replace("$", "").replace("*", "")
        try:
            parse_sentence(nmea_sentence(body))
        except DriverError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_line_parser(data: bytes) -> None:
    rx = re.compile(r"(?P<a>\S+)\s+(?P<b>\S+)?")
    fields = {"a": LineField(type="int", scale=2.0), "b": LineField(type="float")}
    for encoding in ("ascii", "utf-8", "latin-1"):
        try:
            parse_line(data, rx, fields, encoding)
        except DriverError:
            pass


TYPES = ["int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(TYPES), st.sampled_from(["big", "little"]), st.sampled_from(["big", "little"]),
       st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4), st.floats(-1e6, 1e6))
def test_fuzz_modbus_decode(typ: str, bo: str, wo: str, regs: list[int], scale: float) -> None:
    p = ModbusPoint(address=0, type=typ, byte_order=bo, word_order=wo,  # type: ignore[arg-type]
                    scale=scale or 1.0)
    value = decode_value(regs[:p.width], p)
    assert value is None or isinstance(value, int | float)


class _FeedPort:
    """Stands in for the serial port under `ModbusLine._receive`: serves a fixed byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    async def read_frame(self, ready, timeout_s: float, device: str, what: str = "") -> bytes:  # type: ignore[no-untyped-def]
        from drivers.base import ReadTimeoutError

        n = ready(self.data)  # may drop leading garbage, as the real port's predicate does
        if not n:
            raise ReadTimeoutError(device, "no more bytes")
        out = bytes(self.data[:n])
        del self.data[:n]
        return out


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([1, 2, 3, 4, 5, 6, 15, 16]))
async def test_fuzz_modbus_response_frames(data: bytes, fc: int) -> None:
    from pymodbus.framer.rtu import FramerRTU

    line = ModbusLine.__new__(ModbusLine)
    ModbusLine.__init__(line, _FeedPort(b""))  # type: ignore[arg-type]
    # half the time, make the fuzz a frame with a valid CRC for unit 1 so decoding is reached
    if data and data[0] & 1:
        frame = bytes([1, fc]) + data[1:]
        data = frame + FramerRTU.compute_CRC(frame).to_bytes(2, "big")
    line.port = _FeedPort(data)  # type: ignore[assignment]
    try:
        await line._receive(1, fc, 1.0, "fuzz")
    except DriverError:
        pass
    _FUZZ_RUNS.append(1)


_FUZZ_RUNS: list[int] = []


def test_async_fuzz_really_ran() -> None:
    assert len(_FUZZ_RUNS) >= 100


def test_scaled_values_carry_no_binary_noise() -> None:
    assert decode_value([2301], ModbusPoint(address=0, scale=0.1)) == 230.1
    rx = re.compile(r"V=(?P<v>\d+)")
    assert parse_line(b"V=2301", rx, {"v": LineField(type="int", scale=0.1)}, "ascii") == {"v": 230.1}
