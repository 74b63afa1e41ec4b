"""The EnOS uplink section through the real config loader (TOML, secret files, errors)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gatewayd.config import load
from gatewayd.errors import ConfigError
from gatewayd.uplinks.enos import EnosConfig

CONFIG = """
[gateway]
id = "pi-01"
state_dir = "state"

[[devices]]
name = "meter1"
driver = "sim"

[[devices]]
name = "cpu"
driver = "sim"

[uplinks.enos]
type = "enos"
host = "iot-mqtt.example.com"
port = 18883
product_key = "GWPK01"
device_key = "gw-001"
device_secret_file = "gw.secret"
tls = true
ca_file = "enos-ca.pem"
keepalive = 120
max_message_bytes = "256KiB"

[uplinks.enos.devices.meter1]
product_key = "SUBPK01"
device_key = "meter-001"
device_secret_file = "meter1.secret"
points = { value = "temp" }
quality_points = ["temp"]

[uplinks.enos.devices.cpu]
gateway = true
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "gw.secret").write_text("gwSecret001\n")
    (tmp_path / "meter1.secret").write_text("subSecret001\n")
    p = tmp_path / "gatewayd.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_enos_section_loads_with_secret_files(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, CONFIG))
    (u,) = cfg.uplinks
    opts = u.options
    assert isinstance(opts, EnosConfig)
    assert opts.device_secret is not None and opts.device_secret.reveal() == "gwSecret001"
    sub = opts.devices["meter1"]
    assert sub.device_secret is not None and sub.device_secret.reveal() == "subSecret001"
    assert (sub.points, opts.max_message_bytes, opts.keepalive) == ({"value": "temp"}, 262144, 120)
    assert opts.devices["cpu"].gateway
    assert "subSecret001" not in repr(opts)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("keepalive = 120", "keepalive = 30", "uplinks.enos.keepalive: expected a value from 60"),
    ('max_message_bytes = "256KiB"', 'max_message_bytes = "1MiB"', "max_message_bytes must be"),
    ('device_secret_file = "gw.secret"\n', "", "device_secret_file/_env (static) or product"),
    ('[uplinks.enos.devices.cpu]', '[uplinks.enos.devices.attic]', "no device or actuator named"),
    ('device_secret_file = "meter1.secret"', 'nothing = 1', "unknown key"),
])
def test_enos_section_errors_name_the_key(tmp_path: Path, old: str, new: str,
                                          expected: str) -> None:
    assert old in CONFIG
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, CONFIG.replace(old, new)))
    assert expected in str(err.value)
    assert "gwSecret001" not in str(err.value)
