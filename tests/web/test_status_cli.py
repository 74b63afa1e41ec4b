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
    # the UPLINK table's rows only: a draining backlog adds an "archive backlog [###..]" line
    # right below the table, which must not stand in for archive's row
    header = next(i for i, line in enumerate(lines) if line.startswith("UPLINK "))
    table = lines[header + 1:header + 1 + len(bench.uplinks)]
    uplinks = {line.split()[0]: line.split()[1] for line in table}
    assert set(uplinks) == set(bench.uplinks)
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


def test_a_draining_backlog_shows_as_a_progress_bar() -> None:
    from gatewayd.web.term import render

    up = {"type": "enos", "state": "connected", "since": 0, "last_error": "", "sent": 10,
          "dropped": 0, "backlog": {"rows": 250, "bytes": 0, "oldest_ts_ms": None,
                                    "drain": {"peak": 1000, "pct": 75.0, "rate_per_s": 50.0,
                                              "eta_s": 5}}}
    idle = {**up, "backlog": {"rows": 0, "bytes": 0, "oldest_ts_ms": None,
                              "drain": {"peak": 0, "pct": 100.0, "rate_per_s": 0.0, "eta_s": None}}}
    doc = {"gateway": "gw", "devices": {}, "uplinks": {"cloud": up, "archive": idle}}
    lines = [line for line in render(doc).splitlines() if "backlog  [" in line]
    assert lines == ["cloud backlog  [" + "#" * 22 + "." * 8 + "]  75.0%  250 of 1,000 left  "
                     "50/s  ETA 5s"]
