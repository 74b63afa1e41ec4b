"""`gatewayd check` for a newcomer and an operator: --no-secrets, errors that point at the real
mistake (never a false second one), "did you mean", command actions checked against the
actuator, and secret files named by their full path."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd import cli
from gatewayd.config import load
from gatewayd.errors import ConfigError

from .conftest import ROOT
from .test_config import GOOD, write

EXAMPLE = ROOT / "config.example.toml"


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    return [p.split(": ", 1)[1] for p in info.value.problems]  # drop the file name


def test_example_checks_without_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "-q", "--no-secrets", "-c", str(EXAMPLE)]) == 0
    err = capsys.readouterr().err
    assert "config OK" in err and "secrets not read" in err


def test_missing_secret_files_name_the_full_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(EXAMPLE, tmp_path / "gw.toml")
    monkeypatch.chdir(tmp_path)  # a relative config path, as a newcomer types it
    assert cli.main(["check", "-q", "-c", "gw.toml"]) == 78
    err = capsys.readouterr().err
    missing = re.findall(r"cannot read secret file (\S+)", err)
    assert len(missing) == 5, err
    assert all(Path(p).is_absolute() and Path(p).parent == tmp_path for p in missing), missing
    assert str(tmp_path / "enos-gw-secret") in err
    assert "--no-secrets" in err  # the way out is named


def test_no_secrets_still_checks_everything_else(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('interval = "30s"', 'interval = "fast"', 1)
    p = tmp_path / "gw.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(p, read_secrets=False)
    assert len(info.value.problems) == 1
    assert 'devices[0].interval: expected a duration' in info.value.problems[0]


def test_unknown_key_suggests_and_lists_the_common_keys(tmp_path: Path) -> None:
    got = problems(tmp_path, GOOD.replace('interval = "1s"', 'intervall = "1s"'))
    assert len(got) == 1, got
    assert got[0].startswith("devices[0].intervall: unknown key (did you mean 'interval'?)")
    listed = got[0].split("expected one of: ")[1].rstrip(")").split(", ")
    assert {"interval", "timeout", "jitter", "backoff_max", "name", "driver", "points"} <= set(listed)


def test_unknown_uplink_key_lists_type_and_start(tmp_path: Path) -> None:
    got = problems(tmp_path, GOOD.replace('path = "out.jsonl"', 'path = "out.jsonl"\nstrat = "oldest"'))
    assert len(got) == 1, got
    assert "uplinks.archive.strat: unknown key (did you mean 'start'?)" in got[0]
    assert "type" in got[0].split("expected one of: ")[1]


@pytest.mark.parametrize("change,expected", [
    (('driver = "sim"', 'driver = "simm"'), "devices[0].driver: unknown driver 'simm' (did you mean 'sim'?)"),
    (('type = "jsonl"', 'type = "jsonll"'), "uplinks.archive.type: unknown uplink type 'jsonll' (did you mean 'jsonl'?)"),
    (('actuator = "relay"', 'actuator = "rellay"'), "commands[0].actuator: no actuator named 'rellay' (did you mean 'relay'?)"),
    (('uplink = "archive"', 'uplink = "archiv"'), "commands[0].uplink: no uplink named 'archiv' (did you mean 'archive'?)"),
    (('[gateway]', '[gatway]'), "gatway: unknown section (did you mean 'gateway'?)"),
])
def test_did_you_mean_on_names(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    got = problems(tmp_path, GOOD.replace(*change))
    assert any(p.startswith(expected) for p in got), got


def test_literal_choice_suggests(tmp_path: Path) -> None:
    got = problems(tmp_path, GOOD + '\n[queue]\nfsync = "alway"\n')
    assert got == ['queue.fsync: expected one of "always", "normal", "off", got "alway" '
                   "(did you mean 'always'?)"]


def test_one_device_mistake_gives_one_error(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('request_timeout = "500ms"', 'request_timeout = "soon"')
    p = tmp_path / "gw.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(p, read_secrets=False)
    assert len(info.value.problems) == 1, info.value.problems
    assert "devices[3].request_timeout: expected a duration" in info.value.problems[0]


def test_uplink_device_map_names_a_missing_device_with_a_suggestion(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("[uplinks.enos.devices.main-meter]",
                                       "[uplinks.enos.devices.main-metre]")
    p = tmp_path / "gw.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(p, read_secrets=False)
    assert len(info.value.problems) == 1, info.value.problems
    assert "no device or actuator named 'main-metre'" in info.value.problems[0]
    assert "(did you mean 'main-meter'?)" in info.value.problems[0]


def test_actuator_action_checked_against_the_actuator(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('actuator_action = "set"      #', 'actuator_action = "sett"      #')
    p = tmp_path / "gw.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(p, read_secrets=False)
    assert len(info.value.problems) == 1, info.value.problems
    assert ("commands[0].actuator_action: actuator 'relays' (pcf8574) has no action 'sett' "
            "(did you mean 'set'?) (actions: get, pulse, set)") in info.value.problems[0]


def test_action_without_actuator_action_is_checked_too(tmp_path: Path) -> None:
    serial = """
[[actuators]]
name = "box"
driver = "serial_command"
port = "loop://"
commands.on = "ON\\r"
commands.off = "OFF\\r"

[[commands]]
action = "onn"
actuator = "box"
"""
    got = problems(tmp_path, GOOD + serial)
    assert got == ["commands[1].action: actuator 'box' (serial_command) has no action 'onn' "
                   "(did you mean 'on'?) (actions: off, on)"]
    # The log actuator takes any action: no error.
    assert load(write(tmp_path, GOOD.replace('action = "set_relay"', 'action = "anything"')))


def test_readme_check_command_works_as_written(tmp_path: Path) -> None:
    """The README's first-steps block, run literally from the checkout."""
    readme = (ROOT / "README.md").read_text()
    lines = [ln.split("#")[0].strip() for ln in readme.splitlines()
             if ln.startswith(".venv/bin/gatewayd check")]
    assert lines, "the README shows how to run gatewayd check from the venv"
    venv = Path(sys.prefix)
    for line in lines:
        # In the floor-version suite the venv is another one; the command is the same.
        cmd = line if venv == ROOT / ".venv" else line.replace(".venv/", f"{venv}/", 1)
        proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert "config OK" in proc.stderr
    assert ". .venv/bin/activate" in readme  # the other way to reach it
