"""/metrics follows Prometheus conventions (checked by promtool), the README lists every metric,
/healthz is liveness and /readyz readiness, and /status uses one time unit and config names."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import textwrap
import time
import urllib.request
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
    from gatewayd.metrics import Metrics, generate_latest

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


def _raw(port: int, request: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(request)
    return s


def _head(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers, and what came after the head so far."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:])}, rest


def test_page_headers_head_and_no_aiohttp(running: tuple[Daemon, str]) -> None:
    d, base = running
    port = int(base.rsplit(":", 1)[1])
    csp = "default-src 'self'; img-src 'self' data:"
    for path, ctype in (("/", "text/html; charset=utf-8"), ("/assets/app.js", "text/javascript; charset=utf-8"),
                        ("/assets/app.css", "text/css; charset=utf-8")):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            assert r.headers["Content-Type"] == ctype and r.headers["Cache-Control"] == "no-cache"
            assert r.headers["Content-Security-Policy"] == csp
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            size = len(r.read())
        req = urllib.request.Request(base + path, method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert int(r.headers["Content-Length"]) == size and r.read() == b""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
    for path in ("/assets/index.html", "/assets/nope.js", "/nope"):
        code, body = _get(base + path)
        assert code == 404 and json.loads(body)["code"] == 404
    # one connection, several requests (keep-alive), then a malformed one: 400, closed
    s = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    f = s.makefile("rb")
    for _ in range(2):
        assert f.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        assert json.loads(f.read(length))
    s.sendall(b"BROKEN\r\n\r\n")
    assert f.readline().startswith(b"HTTP/1.1 400")
    f.close()
    s.close()
    # the health server no longer loads aiohttp: none of its compiled parts are mapped
    assert d.proc is not None
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "/aiohttp/" not in maps and "/multidict/" not in maps and "/yarl/" not in maps


def test_event_streams_are_capped_and_freed_when_clients_go(running: tuple[Daemon, str]) -> None:
    from gatewayd.web.view import MAX_CLIENTS

    _, base = running
    port = int(base.rsplit(":", 1)[1])
    streams = []
    for _ in range(MAX_CLIENTS):
        s = _raw(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        code, headers, rest = _head(s)
        assert code == 200 and headers["content-type"] == "text/event-stream"
        assert headers["cache-control"] == "no-store"
        while b"\n\n" not in rest:
            rest += s.recv(65536)
        assert rest.startswith(b"retry: 2000\nevent: snapshot\ndata: {")
        streams.append(s)
    extra = _raw(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    code, _, rest = _head(extra)
    assert code == 503 and b"too many status page clients" in rest
    extra.close()
    streams.pop().close()  # one client goes: its place is free again as soon as the server sees it
    deadline = time.monotonic() + 10
    while True:
        s = _raw(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        code, _, _ = _head(s)
        if code == 200 or time.monotonic() > deadline:
            break
        s.close()
    assert code == 200
    streams.append(s)
    for s in streams:
        s.close()
    code, _ = _get(base + "/healthz")
    assert code == 200
