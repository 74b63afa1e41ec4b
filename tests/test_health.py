"""/metrics follows Prometheus conventions (checked by promtool), the README lists every metric,
/healthz is liveness and /readyz readiness, and /status uses one time unit and config names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayd import __version__

from .conftest import ROOT, Daemon, free_port
from .test_daemon import _get, write_config

PROMTOOL = shutil.which("promtool")


def _start(tmp_path: Path, daemons: list[Daemon], extra: str = "") -> tuple[Daemon, str]:
    port = free_port()
    d = Daemon(write_config(tmp_path, health_port=port, extra=extra), tmp_path / "daemon.log").start()
    daemons.append(d)
    d.event("gateway_ready")
    return d, f"http://127.0.0.1:{port}"


BROKEN_DEVICE = textwrap.dedent("""
    [[devices]]
    name = "broken"
    driver = "sim"
    interval = "50ms"
    points.x = { fail_every = 1 }
""")


@pytest.fixture
def running(tmp_path: Path, daemons: list[Daemon]) -> tuple[Daemon, str]:
    d, base = _start(tmp_path, daemons, BROKEN_DEVICE)
    d.find(lambda e: e.get("event") == "device_failing" and e.get("device") == "broken")
    d.event("queue_committed")
    return d, base


def _families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def test_metrics_follow_the_conventions(running: tuple[Daemon, str]) -> None:
    _, base = running
    code, body = _get(base + "/metrics")
    text = body.decode()
    assert code == 200
    families = _families(text)
    assert "_created" not in text
    assert "gatewayd_driver_stat" not in families  # a gauge that held counters
    assert families["gatewayd_driver_events_total"] == "counter"
    for name, kind in families.items():
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
    assert families["process_cpu_seconds_total"] == "counter"
    assert "process_resident_memory_bytes" in families
    m = re.search(r'^gatewayd_build_info\{commit="([^"]*)",version="([^"]+)"\} 1\.0$', text, re.M)
    assert m, text
    assert m.group(2) == __version__ and m.group(1)


def test_driver_counters_are_counters() -> None:
    from prometheus_client import generate_latest

    from gatewayd.metrics import Metrics

    m = Metrics()
    m.driver_events = lambda: [("meter", "crc_errors", 7)]
    text = generate_latest(m.registry).decode()
    assert "# TYPE gatewayd_driver_events_total counter" in text
    assert 'gatewayd_driver_events_total{device="meter",event="crc_errors"} 7.0' in text


def test_promtool_accepts_the_metrics(running: tuple[Daemon, str]) -> None:
    assert PROMTOOL is not None, "promtool is missing: install Debian's prometheus (.ci/run does)"
    _, base = running
    _, body = _get(base + "/metrics")
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
        (proc.stdout + proc.stderr).decode()


def test_readme_lists_every_metric(running: tuple[Daemon, str]) -> None:
    _, base = running
    _, body = _get(base + "/metrics")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Health, metrics and status"):]
    section = section[:section.index("\n## ", 5)]
    missing = []
    for name in _families(body.decode()):
        if name.startswith("process_"):
            continue
        if f"`{name}" not in section:
            missing.append(name)
    assert not missing, f"metrics not in the README: {missing}"
    assert "process_*" in section


def _walk(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _walk(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in _walk(v, f"{path}[{i}]")]
    return [(path, obj)]


def test_status_uses_seconds_and_config_names(running: tuple[Daemon, str]) -> None:
    _, base = running
    _, body = _get(base + "/status")
    status = json.loads(body)
    now = time.time()
    for path, _value in _walk(status):
        assert not path.endswith("_ms"), f"{path}: /status gives times in seconds"
    fast = status["devices"]["fast-a"]
    assert fast["driver"] == "sim"  # the config's driver name, not a class name
    for key in ("since", "last_read"):
        assert now - 3600 < fast[key] <= now + 5, (key, fast[key])  # epoch seconds
    assert status["devices"]["broken"]["last_read"] is None  # never read
    assert status["uplinks"]["archive"]["type"] == "jsonl"
    assert now - 3600 < status["uplinks"]["archive"]["since"] <= now + 5
    assert status["actuators"]["relay"]["driver"] == "log"


def test_healthz_is_liveness_and_names_what_is_degraded(running: tuple[Daemon, str]) -> None:
    _, base = running
    code, body = _get(base + "/healthz")
    health = json.loads(body)
    assert code == 200 and health["ok"] is True
    assert any("device broken is failing" in r for r in health["degraded"]), health
    code, body = _get(base + "/readyz")
    assert code == 200 and json.loads(body)["ready"] is True  # one device of three fails


def test_readyz_503_when_every_device_and_every_uplink_fails(tmp_path: Path,
                                                             daemons: list[Daemon]) -> None:
    port = free_port()
    (tmp_path / "pause").touch()  # the archive uplink cannot connect while it exists
    text = write_config(tmp_path, health_port=port).read_text()
    # Keep only the failing device.
    text = re.sub(r"\[\[devices\]\].*?(?=\[\[actuators\]\])", BROKEN_DEVICE + "\n", text, flags=re.S)
    cfg = tmp_path / "all-failing.toml"
    cfg.write_text(text)
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    d.find(lambda e: e.get("event") == "gateway_ready", timeout=30)  # the health server is up
    d.find(lambda e: e.get("event") == "device_failing", timeout=30)
    d.find(lambda e: e.get("event") == "uplink_state" and e.get("state") == "backing_off", timeout=30)
    base = f"http://127.0.0.1:{port}"
    code, body = _get(base + "/readyz")
    ready = json.loads(body)
    assert code == 503, ready
    assert "every device is failing (1)" in ready["reasons"]
    assert "every uplink is failing (1)" in ready["reasons"]
    code, body = _get(base + "/healthz")
    assert code == 200 and json.loads(body)["ok"] is True  # alive: a restart would not help
    (tmp_path / "pause").unlink()
    d.find(lambda e: e.get("event") == "uplink_state" and e.get("state") == "connected", timeout=30)
    code, body = _get(base + "/readyz")
    assert code == 503 and json.loads(body)["reasons"] == ["every device is failing (1)"]
    assert d.stop() == 0
