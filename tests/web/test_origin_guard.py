"""POST /commands refuses what a browser sends on another site's behalf (DNS rebinding, a
cross-site form), on a real daemon; GET stays open to any Host, and a refusal logs once."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, free_port
from tests.test_daemon import write_config


def _request(port: int, method: str, path: str, headers: dict[str, str],
             body: bytes = b"") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body or None,
                     headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw)


def test_state_changing_requests_from_another_site_are_refused(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    port = free_port()
    cfg = write_config(tmp_path, health_port=port)
    text = cfg.read_text()
    assert "allow_commands = true\n" in text
    cfg.write_text(text.replace("allow_commands = true\n",
                                'allow_commands = true\nallowed_hosts = ["gw17.plant.example"]\n', 1))
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    d.event("gateway_ready")
    local = f"127.0.0.1:{port}"

    def post(host: str, origin: str | None = None) -> tuple[int, Any]:
        headers = {"Host": host} if origin is None else {"Host": host, "Origin": origin}
        return _request(port, "POST", "/commands", headers, b"{}")

    # Passed the guard: `{}` is not a command, so the handler itself answers 400.
    passed = [
        post(local),  # curl, a script: no Origin
        post(local, f"http://{local}"),  # the status page's own form
        post(f"localhost:{port}", f"http://localhost:{port}"),
        post(f"[::1]:{port}"),
        post(f"192.168.7.20:{port}", f"http://192.168.7.20:{port}"),  # the Pi by its LAN address
        post(f"gw17.plant.example:{port}", f"http://gw17.plant.example:{port}"),  # allowed_hosts
        post(f"{socket.gethostname()}:{port}"),  # the machine's own name
    ]
    for code, reply in passed:
        assert code == 400 and reply["message"].startswith("expected {"), (code, reply)

    # DNS rebinding: the attacker's name, pointed at 127.0.0.1
    code, reply = post(f"evil.example:{port}", f"http://evil.example:{port}")
    assert code == 403 and "allowed_hosts" in reply["message"], reply
    code, reply = post(f"evil.example:{port}")
    assert code == 403, reply
    # a cross-site form or fetch: right Host, foreign (or opaque) Origin
    for origin in ("http://evil.example", "null", f"https://{local}.evil.example", "file://"):
        code, reply = post(local, origin)
        assert code == 403 and "cross-origin" in reply["message"], (origin, reply)

    # reads change nothing: open to any Host (a Prometheus scrape by its DNS name)
    code, status = _request(port, "GET", "/status", {"Host": f"evil.example:{port}"})
    assert code == 200 and "devices" in status

    assert d.stop() == 0
    refused = [e for e in d.events if e.get("event") == "health_request_refused"]
    assert len(refused) == 1, refused  # six refusals, one log line a minute
    assert refused[0]["host"] == f"evil.example:{port}"
