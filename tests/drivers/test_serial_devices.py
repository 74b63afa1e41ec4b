"""Serial drivers against pty simulators: NMEA GPS, line instrument, serial command actuator,
fault modes, unplug/replug, pyserial URLs and RS-485 errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from drivers.base import ActionError, DriverError, Quality, ReadTimeoutError
from drivers.bus import BusManager
from drivers.line import LineConfig, LineDriver, LineField
from drivers.nmea import NMEAConfig, NMEADriver
from drivers.serialcmd import SerialCommand, SerialCommandConfig
from gatewayd_sim.hw.serial import EchoActuatorSim, LineInstrumentSim, NMEASim
from tests.drivers.conftest import wait_for


@pytest.fixture
def gps() -> Iterator[NMEASim]:
    with NMEASim(rate_hz=20) as sim:
        yield sim  # type: ignore[misc]


@pytest.fixture
def instrument() -> Iterator[LineInstrumentSim]:
    with LineInstrumentSim(poll="READ") as sim:
        yield sim  # type: ignore[misc]


@pytest.fixture
def relay_box() -> Iterator[EchoActuatorSim]:
    with EchoActuatorSim() as sim:
        yield sim  # type: ignore[misc]


async def test_nmea_fix_and_no_fix(gps: NMEASim, buses: BusManager) -> None:
    drv = NMEADriver("gps", NMEAConfig(port=gps.path, fix_timeout=1.0), buses)
    await drv.open()
    got = {r.point: r.value for r in await drv.read()}
    assert got == {"lat": pytest.approx(52.520008, abs=1e-6), "long": pytest.approx(13.404954, abs=1e-6),
                   "alt": 34.5, "fix_quality": 1, "satellites": 9}
    gps.lat, gps.lon, gps.fix_quality = -33.8688, -151.2093, 0
    readings = {r.point: r for r in await drv.read()}
    assert readings["fix_quality"].value == 0
    assert readings["lat"].value is None and readings["lat"].quality == Quality.BAD


@pytest.mark.parametrize("fault", ["bad_checksum", "truncate", "silence"])
async def test_nmea_faults_fail_the_read_then_recover(gps: NMEASim, buses: BusManager, fault: str) -> None:
    drv = NMEADriver("gps", NMEAConfig(port=gps.path, fix_timeout=0.3), buses)
    gps.fault = fault  # type: ignore[assignment]
    with pytest.raises(DriverError, match="no valid GGA"):
        await drv.read()
    if fault == "bad_checksum":
        assert drv.checksum_errors > 0
    gps.fault = None
    assert len(await drv.read()) == 5


async def test_nmea_garbage_before_sentences_is_tolerated(gps: NMEASim, buses: BusManager) -> None:
    gps.fault = "garbage"
    drv = NMEADriver("gps", NMEAConfig(port=gps.path, fix_timeout=1.0), buses)
    assert {r.point: r.value for r in await drv.read()}["satellites"] == 9


async def test_nmea_port_unplugged_and_back(gps: NMEASim, buses: BusManager) -> None:
    drv = NMEADriver("gps", NMEAConfig(port=gps.path, fix_timeout=1.0), buses)
    await drv.read()
    gps.unplug()
    with pytest.raises(DriverError, match=r"closed|does not exist|unavailable"):
        await drv.read()
    gps.replug()

    async def back() -> bool:
        try:
            return len(await drv.read()) == 5
        except DriverError:
            return False

    await wait_for(back)


def line_cfg(sim: LineInstrumentSim, **kw: object) -> LineConfig:
    pattern = r"T=(?P<temperature_c>-?[\d.]+) H=(?P<humidity_pct>[\d.]+) ST=(?P<ok>\w+)"
    return LineConfig(port=sim.path, pattern=pattern,
                      fields={"ok": LineField(type="bool")}, response_timeout=0.5, **kw)  # type: ignore[arg-type]


async def test_line_instrument_polled(instrument: LineInstrumentSim, buses: BusManager) -> None:
    drv = LineDriver("probe", line_cfg(instrument, poll="READ\r"), buses)
    got = {r.point: r.value for r in await drv.read()}
    assert got == {"temperature_c": 21.5, "humidity_pct": 40.0, "ok": True}
    instrument.values.update(temperature=-4.25, status="FAIL")
    assert {r.point: r.value for r in await drv.read()}["ok"] is False
    assert instrument.polls == 2


@pytest.mark.parametrize("fault,error", [("bad_checksum", "does not match"), ("silence", "no line"),
                                         ("truncate", "no line")])
async def test_line_instrument_faults(instrument: LineInstrumentSim, buses: BusManager,
                                      fault: str, error: str) -> None:
    drv = LineDriver("probe", line_cfg(instrument, poll="READ\r"), buses)
    instrument.fault = fault  # type: ignore[assignment]
    with pytest.raises(DriverError, match=error):
        await drv.read()
    instrument.fault = None
    assert len(await drv.read()) == 3


async def test_line_instrument_streaming_skips_bad_lines(buses: BusManager) -> None:
    with LineInstrumentSim(poll=None, rate_hz=50) as sim:
        drv = LineDriver("stream", line_cfg(sim), buses)  # type: ignore[arg-type]
        sim.fault = "garbage"  # type: ignore[attr-defined]
        assert len(await drv.read()) == 3  # noise glued before a line still matches by search
        await buses.close()


async def test_serial_command_actuator(relay_box: EchoActuatorSim, buses: BusManager) -> None:
    act = SerialCommand("box", SerialCommandConfig(
        port=relay_box.path, commands={"set": "RELAY {channel} {on}\r"},
        response=r"^OK RELAY (?P<channel>\d+) (?P<state>ON|OFF)$", error=r"^ERR",
        response_timeout=0.5), buses)
    res = await act.apply("set", {"channel": 3, "on": True})
    assert res == {"sent": "RELAY 3 ON", "response": "OK RELAY 3 ON", "channel": "3", "state": "ON"}
    assert relay_box.relays == {3: True}
    with pytest.raises(ActionError, match="missing param 'on'"):
        await act.apply("set", {"channel": 3})
    with pytest.raises(ActionError, match="unknown action"):
        await act.apply("reboot", {})
    relay_box.fault = "silence"
    with pytest.raises(ActionError, match="no answer"):
        await act.apply("set", {"channel": 3, "on": False})
    relay_box.fault = "bad_checksum"
    with pytest.raises(ActionError, match="unexpected answer"):
        await act.apply("set", {"channel": 1, "on": False})
    relay_box.fault = None
    bad = SerialCommand("box2", SerialCommandConfig(
        port=relay_box.path, commands={"x": "HELLO\r"}, response="^OK", error="^ERR"), buses)
    with pytest.raises(ActionError, match="refused"):
        await bad.apply("x", {})


def test_templates_must_use_plain_fields() -> None:
    with pytest.raises(ValueError, match="plain name"):
        SerialCommandConfig(port="/dev/x", commands={"a": "{x.__class__}"})
    with pytest.raises(ValueError, match="bad template"):
        SerialCommandConfig(port="/dev/x", commands={"a": "{oops"})


async def test_loop_url_and_socket_url(buses: BusManager) -> None:
    port = buses.serial("loop://", baudrate=9600)
    await port.write(b"hello\n", "t")
    assert await port.read_until(b"\n", 1.0, "t") == b"hello\n"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        host, p = server.sockets[0].getsockname()[:2]
        sock = buses.serial(f"socket://{host}:{p}")
        await sock.write(b"ping\n", "t")
        assert await sock.read_until(b"\n", 1.0, "t") == b"ping\n"
    finally:
        await buses.close()
        server.close()
        await server.wait_closed()


async def test_settings_mismatch_and_rs485_errors(gps: NMEASim, buses: BusManager) -> None:
    buses.serial(gps.path, baudrate=9600)
    with pytest.raises(ValueError, match="different settings"):
        buses.serial(gps.path, baudrate=4800)
    with pytest.raises(ValueError, match="already used"):
        buses.modbus(gps.path, baudrate=9600)
    rs485 = BusManager().serial(gps.path, rs485=True)
    with pytest.raises(DriverError, match="RS-485 mode is not supported"):
        await rs485.ensure_open("gps")
    await rs485.close()


async def test_missing_port_error_is_readable_and_backs_off(buses: BusManager) -> None:
    port = buses.serial("/dev/ttyDOESNOTEXIST")
    with pytest.raises(DriverError, match="does not exist"):
        await port.ensure_open("x")
    with pytest.raises(DriverError, match="next reopen attempt in"):
        await port.ensure_open("x")


async def test_read_timeout_is_a_read_timeout_error(buses: BusManager) -> None:
    port = buses.serial("loop://")
    with pytest.raises(ReadTimeoutError, match=r"no line within 0\.05s"):
        await port.read_until(b"\n", 0.05, "x")


def test_open_errors_name_the_fix() -> None:
    import serial

    from drivers.serialport import describe_serial_error

    denied = serial.SerialException(13, "could not open port /dev/ttyUSB0: [Errno 13] Permission denied")
    assert "add the user to the 'dialout' group" in describe_serial_error(denied, "/dev/ttyUSB0")
    busy = OSError(16, "Device or resource busy")
    assert "another program" in describe_serial_error(busy, "/dev/ttyAMA0")


@pytest.mark.parametrize("value,lat,text", [
    (52.99999999, True, ("5300.0000", "N")),  # rounds up: carry into the degrees
    (52.999998, True, ("5259.9999", "N")),
    (-13.99999999, False, ("01400.0000", "W")),
    (179.999999999, False, ("18000.0000", "E")),
    (0.5, True, ("0030.0000", "N")),
])
def test_nmea_minutes_round_then_carry(value: float, lat: bool, text: tuple[str, str]) -> None:
    from drivers.nmea import _coord
    from gatewayd_sim.hw.serial import _ddmm

    assert _ddmm(value, lat) == text
    assert _coord(*text, lat) == pytest.approx(value, abs=1e-6)


def test_nmea_emitter_just_below_a_degree_parses(gps: NMEASim) -> None:
    from drivers.nmea import parse_sentence

    gps.lat, gps.lon = 52.99999999, -0.999999999
    gga = gps.sentences()[0]
    assert b"5300.0000,N" in gga and b"00100.0000,W" in gga
    _, fix = parse_sentence(gga)
    assert fix["lat"] == pytest.approx(53.0) and fix["long"] == pytest.approx(-1.0)
