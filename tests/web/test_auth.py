"""[health] auth: required beyond loopback (`gatewayd check` says where), enforced when set."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, Daemon, free_port


def _config(tmp_path: Path, listen: str, auth: str = "") -> Path:
    path = tmp_path / "gatewayd.toml"
    path.write_text(textwrap.dedent(f"""
        [gateway]
        id = "auth-gw"
        state_dir = "{tmp_path / 'state'}"
        [health]
        listen = "{listen}"
        {auth}
        [log]
        level = "debug"
        format = "json"
        [[devices]]
        name = "probe"
        driver = "sim"
        interval = "200ms"
        points.t_c = {{ shape = "walk", seed = 1 }}
        [uplinks.archive]
        type = "jsonl"
        path = "{tmp_path / 'out.jsonl'}"
    """))
    return path


def _check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd", "check", "-q", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def _get(url: str, user: str = "", password: str = "") -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url)
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_binding_beyond_loopback_without_auth_fails_check(tmp_path: Path) -> None:
    r = _check(_config(tmp_path, "0.0.0.0:9847"))
    assert r.returncode == 78
    assert "health.auth: required when listen ('0.0.0.0:9847') is not a loopback address" in r.stderr
    (tmp_path / "health.pw").write_text("s3cret\n")
    r = _check(_config(tmp_path, "0.0.0.0:9847",
                       'auth = { user = "tech", password_file = "health.pw" }'))
    assert r.returncode == 0, r.stderr
    assert _check(_config(tmp_path, "127.0.0.1:9847")).returncode == 0
    r = _check(_config(tmp_path, "0.0.0.0:9847", 'auth = { user = "tech", password_file = "missing.pw" }'))
    assert r.returncode == 78 and "health.auth.password_file" in r.stderr


def test_with_auth_unauthenticated_requests_get_401(tmp_path: Path, daemons: list[Daemon]) -> None:
    (tmp_path / "health.pw").write_text("s3cret\n")
    port = free_port()  # loopback: the tests never listen beyond it; auth applies wherever it is set
    cfg = _config(tmp_path, f"127.0.0.1:{port}", 'auth = { user = "tech", password_file = "health.pw" }')
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    d.event("gateway_ready")
    base = f"http://127.0.0.1:{port}"
    for path in ("/", "/status", "/view.json", "/events", "/metrics", "/assets/app.js"):
        code, headers = _get(base + path)
        assert code == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic")
    assert _get(base + "/view.json", "tech", "wrong")[0] == 401
    assert _get(base + "/view.json", "tech", "s3cret")[0] == 200
    assert _get(base + "/", "tech", "s3cret")[0] == 200
    assert _get(base + "/healthz")[0] == 200  # liveness probes carry no credentials
    # read-only unless allow_commands: no form on the page, no POST /commands
    req = urllib.request.Request(base + "/view.json?history=0")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"tech:s3cret").decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        view = json.loads(resp.read())
    assert view["commands_allowed"] is False and view["command_actions"] == []
    req = urllib.request.Request(base + "/commands", data=b'{"action": "x"}', method="POST")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"tech:s3cret").decode())
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("POST /commands answered without allow_commands")
    except urllib.error.HTTPError as exc:
        assert exc.code in (404, 405)
    d.find(lambda e: e.get("event") == "queue_committed")
    status = [sys.executable, "-m", "gatewayd", "status", "--url", base]
    r = subprocess.run(status, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "HTTP 401" in r.stderr
    r = subprocess.run([*status, "--user", "tech", "--password-file", str(tmp_path / "health.pw")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr  # all ok: exit 0
    assert "probe" in r.stdout and "all ok" in r.stdout
    # or with neither: the address and the credentials from the config's [health]
    r = subprocess.run([sys.executable, "-m", "gatewayd", "status", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "probe" in r.stdout and "all ok" in r.stdout
    assert d.stop() == 0
