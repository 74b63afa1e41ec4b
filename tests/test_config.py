"""Config: every broken config gets a precise message and exit 78; secrets stay hidden."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gatewayd import cli
from gatewayd.config import load
from gatewayd.errors import ConfigError
from gatewayd.schema import Secret, parse_duration, parse_size

from .conftest import ROOT

GOOD = """
[gateway]
id = "gw-1"
state_dir = "state"

[[devices]]
name = "boiler"
driver = "sim"
interval = "1s"
points.temp = { shape = "sine", min = 10, max = 20 }

[[actuators]]
name = "relay"
driver = "log"

[uplinks.archive]
type = "jsonl"
path = "out.jsonl"

[[commands]]
uplink = "archive"
action = "set_relay"
actuator = "relay"
params.channel = { type = "int", min = 0, max = 7 }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gatewayd.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_config_loads_typed(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD))
    assert cfg.gateway.id == "gw-1"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.devices[0].interval == 1.0
    assert cfg.devices[0].options.points["temp"].max == 20.0
    assert cfg.uplinks[0].options.path == "out.jsonl"
    assert cfg.commands[0].params["channel"].max == 7
    assert cfg.queue.commit_window == 0.02  # the default


@pytest.mark.parametrize("value,seconds", [("10s", 10), ("500ms", 0.5), ("2m", 120), ("1h", 3600),
                                           ("7d", 604800), (3, 3.0), (0.25, 0.25)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value,size", [("64MiB", 64 * 2**20), ("512KB", 512000), ("1GiB", 2**30),
                                        (100, 100), ("100B", 100)])
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


BROKEN = [
    # (name, what to change, expected message fragment)
    ("toml syntax", "[gateway\nid='x'", "TOML syntax error"),
    ("no gateway section", GOOD.replace('[gateway]\nid = "gw-1"\nstate_dir = "state"', ""),
     'gateway: missing required section'),
    ("bad duration", GOOD.replace('interval = "1s"', 'interval = "fast"'),
     'devices[0].interval: expected a duration like "10s" or "500ms", got "fast"'),
    ("negative duration", GOOD.replace('interval = "1s"', "interval = -1"),
     "devices[0].interval: expected a duration"),
    ("duration bad unit", GOOD.replace('interval = "1s"', 'interval = "1 fortnight"'),
     "devices[0].interval: expected a duration"),
    ("bad size", GOOD + '\n[queue]\nmax_bytes = "lots"\n', 'queue.max_bytes: expected a size like "64MiB"'),
    ("unknown top key", GOOD + '\n[gatway]\nid="x"\n', "gatway: unknown section"),
    ("unknown device key", GOOD.replace('interval = "1s"', 'interval = "1s"\nintervall = "2s"'),
     "devices[0].intervall: unknown key"),
    ("unknown gateway key", GOOD.replace('state_dir = "state"', 'state_dir = "state"\nname = "x"'),
     "gateway.name: unknown key"),
    ("wrong type bool", GOOD + "\n[health]\nenabled = \"yes\"\n", 'health.enabled: expected true or false, got "yes"'),
    ("wrong type int", GOOD + "\n[queue]\nmax_rows = \"many\"\n", 'queue.max_rows: expected an integer, got "many"'),
    ("int out of range", GOOD + "\n[queue]\nmax_rows = 5\n", "queue.max_rows: expected a value from 1000 to inf, got 5"),
    ("bad literal", GOOD + '\n[queue]\nfsync = "sometimes"\n',
     'queue.fsync: expected one of "always", "normal", "off", got "sometimes"'),
    ("bad listen", GOOD + '\n[health]\nlisten = "localhost"\n', 'health: listen: expected "host:port"'),
    ("allowed host with a port", GOOD + '\n[health]\nallowed_hosts = ["gw17:9847"]\n',
     "health: allowed_hosts: 'gw17:9847' is not a host name"),
    ("allowed hosts not a list", GOOD + '\n[health]\nallowed_hosts = "gw17"\n',
     'health.allowed_hosts: expected an array, got "gw17"'),
    ("unknown driver", GOOD.replace('driver = "sim"', 'driver = "bme281"'),
     "devices[0].driver: unknown driver 'bme281'"),
    ("missing driver", GOOD.replace('driver = "sim"\n', ""), "devices[0].driver: missing required key"),
    ("missing name", GOOD.replace('name = "boiler"\n', ""), "devices[0].name: missing required key"),
    ("bad name", GOOD.replace('name = "boiler"', 'name = "boiler room"'), "devices[0].name: expected a name"),
    ("duplicate device", GOOD + '\n[[devices]]\nname = "boiler"\ndriver = "sim"\n',
     "devices[1].name: duplicate name 'boiler' (already used by devices[0])"),
    ("device and actuator share a name", GOOD.replace('name = "relay"', 'name = "boiler"').replace(
        'actuator = "relay"', 'actuator = "boiler"'),
     "actuators[0].name: duplicate name 'boiler'"),
    ("command to missing actuator", GOOD.replace('actuator = "relay"', 'actuator = "relais"'),
     "commands[0].actuator: no actuator named 'relais' (did you mean 'relay'?) (actuators: relay)"),
    ("command from missing uplink", GOOD.replace('uplink = "archive"', 'uplink = "enos"'),
     "commands[0].uplink: no uplink named 'enos'"),
    ("command min above max", GOOD.replace("min = 0, max = 7", "min = 9, max = 7"),
     "commands[0].params.channel: min (9.0) is above max (7.0)"),
    ("command bad param type", GOOD.replace('type = "int"', 'type = "integer"'),
     "commands[0].params.channel.type: expected one of"),
    ("unknown uplink type", GOOD.replace('type = "jsonl"', 'type = "kafka"'),
     "uplinks.archive.type: unknown uplink type 'kafka'"),
    ("uplink missing key", GOOD.replace('path = "out.jsonl"', ""), "uplinks.archive.path: missing required key"),
    ("driver option check", GOOD.replace("min = 10, max = 20", "min = 30, max = 20"),
     "devices[0].points.temp: max (20.0) is below min (30.0)"),
    ("devices not an array", GOOD.replace("[[devices]]", "[devices]").replace(
        '[[actuators]]', '[[actuators]]'), "devices: expected an array of tables"),
    ("bad gateway id", GOOD.replace('id = "gw-1"', 'id = ""'), "gateway: id: expected a name"),
    ("unknown event loop", GOOD.replace('id = "gw-1"', 'id = "gw-1"\nevent_loop = "trio"'),
     'gateway.event_loop: expected one of "auto", "uvloop", "asyncio", got "trio"'),
]


@pytest.mark.parametrize("name,text,fragment", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    name: str, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    rc = cli.main(["check", "-c", str(path)])
    err = capsys.readouterr().err
    assert rc == 78
    assert fragment in err, err
    assert str(path) in err  # every problem names the file
    assert "Traceback" not in err


def test_several_errors_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace('interval = "1s"', 'interval = "fast"').replace('type = "jsonl"', 'type = "x"') \
        + '\n[queue]\nfsync = "maybe"\n'
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    joined = "\n".join(info.value.problems)
    assert "devices[0].interval" in joined
    assert "uplinks.archive.type" in joined
    assert "queue.fsync" in joined
    assert len(info.value.problems) == 3


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "-c", str(tmp_path / "nope.toml")]) == 78
    assert "cannot read: No such file or directory" in capsys.readouterr().err


# -- secrets ---------------------------------------------------------------------------------------



def test_secret_from_env_file_and_missing(tmp_path: Path) -> None:
    from dataclasses import dataclass

    from gatewayd.schema import Builder

    @dataclass(frozen=True)
    class C:
        password: Secret
        token: Secret | None = None

    (tmp_path / "pw").write_text("s3cret-from-file\n")
    b = Builder(base_dir=tmp_path, env={"PW": "s3cret-from-env"})
    assert b.build(C, {"password_env": "PW"}, "u").password.reveal() == "s3cret-from-env"
    assert b.build(C, {"password_file": "pw"}, "u").password.reveal() == "s3cret-from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pw").write_text("from-credentials-dir")
    b2 = Builder(base_dir=tmp_path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert b2.build(C, {"password_file": "pw"}, "u").password.reveal() == "from-credentials-dir"
    assert not b.errors and not b2.errors

    b3 = Builder(base_dir=tmp_path, env={})
    assert b3.build(C, {"password_env": "NOPE"}, "u") is None
    assert b3.build(C, {}, "u") is None
    assert b3.build(C, {"password_file": "missing"}, "u") is None
    assert b3.build(C, {"password": "a", "password_env": "B"}, "u") is None
    assert b3.errors[0] == "u.password_env: environment variable NOPE is not set or empty"
    assert b3.errors[1] == "u.password: missing secret: set password_env or password_file"
    assert b3.errors[2].startswith("u.password_file: cannot read secret file")
    assert b3.errors[3] == "u.password: give only one of password, password_env"


def test_secret_never_shows_itself() -> None:
    from gatewayd.schema import to_plain

    s = Secret("hunter2", "env PW")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert to_plain({"password": s}) == {"password": "<secret from env PW>"}


def test_run_exits_78_on_bad_config_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('interval = "1s"', 'interval = "fast"'))
    proc = subprocess.run([sys.executable, "-m", "gatewayd", "run", "-c", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 78
    assert "devices[0].interval" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The annotated reference passes `check`, its secrets coming from systemd credentials."""
    import re

    text = (ROOT / "config.example.toml").read_text()
    for name in re.findall(r'^[a-z_]+_file = "([^"/]+)"', text, flags=re.M):
        (tmp_path / name).write_text("dummy-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert cli.main(["check", "-c", str(ROOT / "config.example.toml")]) == 0, capsys.readouterr().err
    assert "dummy-secret" not in capsys.readouterr().out
