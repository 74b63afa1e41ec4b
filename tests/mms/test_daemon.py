"""The whole daemon (`gatewayd run`) with an MMS uplink against `gatewayd sim mms`, both as real
processes: config loading, service wiring, sampling, delivery, a push to a relay and its result."""

from __future__ import annotations

import base64
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

from gatewayd_sim.mms import RESULT_TYPE
from tests.conftest import ROOT, Daemon, free_port
from tests.mms.conftest import PUSH_USER as DEFAULT_PUSH_USER

TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.fixture
def sim_proc() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "sim", "mms", "--port", str(port), "--device", f"gw-dev:{TOKEN}",
         "--push-user", ":".join(DEFAULT_PUSH_USER)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: get(f"{url}/sim/tables") is not None, "simulator up")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def poll(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll another process's state over HTTP until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)


def test_daemon_delivers_readings_and_answers_a_push(
    tmp_path: Path, sim_proc: str, daemons: list[Daemon]
) -> None:
    config = tmp_path / "gatewayd.toml"
    config.write_text(f"""
[gateway]
id = "gw-mms"
state_dir = "{tmp_path / "state"}"

[health]
enabled = false

[[devices]]
name = "boiler"
driver = "sim"
interval = "100ms"
points.temp_c = {{ shape = "sine", min = 50, max = 70, period = "10s" }}

[[actuators]]
name = "relay"
driver = "log"

[[commands]]
uplink = "cloud"
action = "switch"
actuator = "relay"
params.operand = {{ type = "str", choices = ["on", "off"] }}

[uplinks.cloud]
type = "mms"
host = "{sim_proc}"
device_id = "gw-dev"
token_env = "MMS_TOKEN"
transport = "ws"
result_message_type = "{RESULT_TYPE}"
""")
    daemon = Daemon(config, tmp_path / "daemon.log", env={"MMS_TOKEN": TOKEN}).start()
    daemons.append(daemon)
    daemon.event("gateway_ready")
    poll(lambda: (get(f"{sim_proc}/sim/rows/m0t0y0p0e1") or {}).get("count", 0) >= 5, "readings stored")
    rows = get(f"{sim_proc}/sim/rows/m0t0y0p0e1")["rows"]
    assert all(r["G_DEVICE"] == "gw-dev" and r["C_SENSOR"] == "boiler.temp_c" for r in rows)
    assert all(50 <= float(r["C_VALUE"]) <= 70 for r in rows)
    now_s = time.time()
    assert all(now_s - 60 < r["C_TIMESTAMP"] <= now_s + 1 for r in rows)

    basic = base64.b64encode(":".join(DEFAULT_PUSH_USER).encode()).decode()
    body = {
        "method": "ws",
        "sender": "test",
        "messageType": "m0t0y0p0e3",
        "messages": [{"opcode": "switch", "operand": "on"}],
    }
    req = urllib.request.Request(
        f"{sim_proc}/com.sap.iotservices.mms/v1/api/http/push/gw-dev",
        json.dumps(body).encode(),
        {"Authorization": f"Basic {basic}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert "pushed" in json.loads(r.read())["msg"]
    poll(
        lambda: (get(f"{sim_proc}/sim/rows/{RESULT_TYPE}") or {}).get("count", 0) >= 1,
        "command result stored",
    )
    (result,) = get(f"{sim_proc}/sim/rows/{RESULT_TYPE}")["rows"]
    assert (result["C_OK"], result["C_CODE"], result["C_MESSAGE"]) == (True, 200, "ok")
    daemon.wait_for(lambda e: e.get("event") == "command_done" and e.get("action") == "switch")
    assert daemon.stop() == 0
    assert not any(TOKEN in json.dumps(e) for e in daemon.events)  # the token never hits the log
