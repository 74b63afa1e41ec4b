"""Driver config keys through the daemon's config loader: TOML in, typed options out, and
precise errors with key paths for bad driver keys."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from drivers.gpio import MCP23017Config
from drivers.line import LineConfig
from gatewayd.config import load
from gatewayd.errors import ConfigError

HEAD = '[gateway]\nid = "gw"\n'


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "gatewayd.toml"
    p.write_text(HEAD + textwrap.dedent(body))
    return p


def test_serial_and_expander_configs_load_typed(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, r"""
        [[devices]]
        name = "scale"
        driver = "line"
        port = "/dev/serial/by-id/usb-FTDI-if00"
        baudrate = 4800
        parity = "E"
        rs485 = true
        rs485_delay_before_tx = "2ms"
        poll = "W\r"
        pattern = 'W=(?P<weight_kg>[-\d.]+)'
        fields.weight_kg = { scale = 0.001 }

        [[actuators]]
        name = "io"
        driver = "mcp23017"
        bus = "1"
        address = 0x21
        outputs = [0, 1, 8]
        initial_on = [8]
    """))
    line = cfg.devices[0].options
    assert isinstance(line, LineConfig)
    assert line.serial_settings()["parity"] == "E" and line.rs485_delay_before_tx == 0.002
    assert line.poll == "W\r" and line.fields["weight_kg"].scale == 0.001
    io = cfg.actuators[0].options
    assert isinstance(io, MCP23017Config) and io.address == 0x21 and io.initial_on == [8]


@pytest.mark.parametrize("body,expected", [
    ('driver = "bme280"\naddress = 0x40', "devices[0]: address must be 0x76 or 0x77"),
    ('driver = "bme280"\noversampling_t = 3', "devices[0].oversampling_t: expected one of 0, 1, 2, 4, 8, 16"),
    ('driver = "modbus"\nport = "/dev/ttyUSB0"\nunit = 1\npoints.p = { address = 1, type = "int24" }',
     "devices[0].points.p.type: expected one of"),
    ('driver = "modbus"\nport = "/dev/ttyUSB0"\nunit = 300\npoints.p = { address = 1 }',
     "devices[0]: unit must be 1..247"),
    ('driver = "line"\nport = "/dev/ttyUSB0"\npattern = "(unclosed"', "not a valid regular expression"),
    ('driver = "ads1115"\npoints.v = { channel = "5" }', "devices[0].points.v: channel must be one of"),
    ('driver = "sht"\nbaudrate = 9600', "devices[0].baudrate: unknown key"),
])
def test_bad_driver_keys_are_reported_with_their_path(tmp_path: Path, body: str, expected: str) -> None:
    path = write(tmp_path, '[[devices]]\nname = "d"\n' + body + "\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert expected in str(info.value)
