"""`gatewayd status` against a running daemon."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT
from tests.web.conftest import Bench


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd", "status", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_status_table_and_exit_code_when_a_device_fails(bench: Bench) -> None:
    bench.daemon.find(lambda e: e.get("event") == "device_failing" and e.get("device") == "broken-meter")
    bench.daemon.find(lambda e: e.get("event") == "queue_committed")
    r = status("--url", bench.url)
    assert r.returncode == 1, r
    lines = r.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines if line and line.split()[0] in bench.devices}
    assert set(rows) == set(bench.devices)
    assert "FAILING" in rows["broken-meter"] and "simulated fault" in rows["broken-meter"]
    assert rows["boiler"].split()[1] == "OK"
    assert "temperature_c=" in rows["boiler"] and "°C" in rows["boiler"]
    uplinks = {line.split()[0]: line.split()[1] for line in lines
               if line and line.split()[0] in bench.uplinks}
    assert uplinks["archive"] == "CONNECTED"
    assert uplinks["opshub"] != "CONNECTED"
    assert any(line.startswith("QUEUE") and "storage=OK" in line for line in lines)
    assert "  device broken-meter failing: broken-meter: simulated fault" in r.stdout
    # the same view as JSON, for scripts
    r = status("--url", bench.url, "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["devices"]["broken-meter"]["state"] == "failing"


def test_status_unreachable_daemon_exits_2() -> None:
    from tests.conftest import free_port

    r = status("--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2
    assert "cannot reach" in r.stderr
