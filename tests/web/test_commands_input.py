"""POST /commands with hostile input: a 4xx JSON error reply, never a traceback (issue 10.5)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Daemon, free_port
from tests.test_daemon import write_config

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=30)
command_like = st.fixed_dictionaries(
    {"action": st.one_of(st.text(max_size=20), st.sampled_from(["set_relay"]), json_values)},
    optional={"params": json_values, "device": json_values, "id": json_values})


def _post(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/commands", body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw)


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    inner = b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"action": "set_relay", "params": ' + inner + b"}" if kind == "params" else inner


def test_post_commands_never_answers_with_a_traceback(tmp_path: Path, daemons: list[Daemon]) -> None:
    port = free_port()
    d = Daemon(write_config(tmp_path, health_port=port), tmp_path / "daemon.log").start()
    daemons.append(d)
    d.event("gateway_ready")

    def expect_4xx(body: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        code, reply = _post(port, body, headers)
        assert 400 <= code < 500 or (code == 200 and reply["ok"]), (code, reply, body[:100])
        assert isinstance(reply, dict) and "ok" in reply and "message" in reply
        return reply

    # nesting 10,000 deep: as the body, as a params object, and just past the params limit
    for kind in ("list", "dict", "params"):
        reply = expect_4xx(_nested(10_000, kind))
        assert reply["code"] == 400
    assert expect_4xx(_nested(17, "params"))["message"] == "params nest deeper than 16 levels"
    # huge: over the cap by length, and by a chunked body with no length
    assert expect_4xx(b'{"action": "' + b"x" * 200_000 + b'"}')["code"] == 413

    def chunks() -> Any:
        for _ in range(100):
            yield b" " * 4096

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/commands", body=chunks(), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["code"] == 413
    conn.close()
    # binary and broken UTF-8
    assert expect_4xx(b"\xff\xfe\x00\x01garbage")["code"] == 400
    assert expect_4xx(b'{"action": "\xc3\x28"}')["code"] == 400

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(json_values.map(lambda v: json.dumps(v).encode()),
                     command_like.map(lambda v: json.dumps(v).encode()),
                     st.binary(max_size=200)))
    def anything(body: bytes) -> None:
        expect_4xx(body)

    anything()
    # the daemon is still healthy and logged no traceback for any of it
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    d.new_events()
    bad = [e for e in d.events if e.get("level") in ("error", "critical") or "exception" in e]
    assert not bad, bad[:3]
    assert d.stop() == 0
