"""The whole daemon (`gatewayd run`) with an Operations Hub uplink, against `gatewayd sim opshub`:
the config loader accepts the documented keys, readings reach the read-back route, and a queued
command switches a relay and reports its result. Both run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Daemon

GW = "01-23-45-67-89-ab"


def _http(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as resp:
        return json.loads(resp.read())


def _until(predicate: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)  # polling another process over HTTP; the predicate is the sync point
    raise AssertionError("timed out")


@pytest.fixture
def sim_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "gatewayd", "sim", "opshub", "--port", "0",
                             "--user", "OPS:field-pw"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b'{"opshub_sim"'):
                yield json.loads(line)["opshub_sim"]
                break
        else:
            raise AssertionError("simulator exited before listening")
    finally:
        proc.terminate()
        proc.wait(10)


CONFIG = """
[gateway]
id = "field-gw"
state_dir = "state"

[health]
enabled = false

[log]
format = "json"

[[devices]]
name = "boiler"
driver = "sim"
interval = "100ms"
points.temperature_c = {{ shape = "sine", min = 55.0, max = 75.0, period = "60s" }}

[[actuators]]
name = "relay-board"
driver = "log"

[uplinks.hub]
type = "opshub"
url = "{url}"
allow_http = true
username = "OPS"
password_env = "OPSHUB_PASSWORD"
gateway_id = "{gw}"
poll_interval = "100ms"
backoff_cap = "1s"
devices.boiler = {{ sensor = "boiler1", points.temperature_c = {{ met = "temperature", desc = "degC" }} }}

[[uplinks.hub.commands]]
pattern = 'relay(?P<channel>\\d)=(?P<on>on|off)'
action = "set_relay"
device = "relay-board"

[[commands]]
uplink = "hub"
action = "set_relay"
actuator = "relay-board"
actuator_action = "set"
params.channel = {{ type = "int", min = 0, max = 7 }}
params.on = {{ type = "bool" }}
"""


def test_daemon_publishes_and_runs_a_polled_command(tmp_path: Path, sim_url: str,
                                                    daemons: list[Daemon]) -> None:
    cfg = tmp_path / "gatewayd.toml"
    cfg.write_text(CONFIG.format(url=sim_url, gw=GW))
    d = Daemon(cfg, tmp_path / "daemon.log", env={"OPSHUB_PASSWORD": "field-pw"})
    daemons.append(d.start())
    d.event("gateway_ready")
    rows = _until(lambda: _http(f"{sim_url}/sim/data?dc=OPS/{GW}/boiler1&limit=5")["rows"])
    assert rows[0]["metric"] == "temperature" and rows[0]["description"] == "degC"
    assert 55.0 <= float(rows[0]["data"]) <= 75.0

    _http(f"{sim_url}/sim/commands", {"dc": f"OPS/{GW}", "command": "relay3=on"})
    done = d.wait_for(lambda e: e.get("event") == "command_done")
    assert (done["ok"], done["device"], done["action"]) == (True, "relay-board", "set_relay")
    result = _until(lambda: _http(f"{sim_url}/sim/data?metric=cmd_result")["rows"])
    assert (result[0]["dc"], result[0]["data"], result[0]["generic_2"]) == (
        f"OPS/{GW}/gateway", "200", "relay3=on")
    assert d.stop() == 0
    assert "field-pw" not in (tmp_path / "daemon.log").read_text()
