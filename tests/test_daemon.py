"""The daemon as a real process: SIGKILL crash safety, graceful stop, corrupt state, endpoints,
and the systemd notify protocol."""

from __future__ import annotations

import json
import random
import socket
import sqlite3
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gatewayd.loop import choose as choose_loop

from .conftest import Daemon, free_port

BATCH = 200


def write_config(tmp_path: Path, *, health_port: int | None = None, extra: str = "",
                 event_loop: str = "auto") -> Path:
    health = (f'[health]\nlisten = "127.0.0.1:{health_port}"\nallow_commands = true\n'
              if health_port else "[health]\nenabled = false\n")
    text = textwrap.dedent(f"""
        [gateway]
        id = "test-gw"
        state_dir = "{tmp_path / 'state'}"
        stop_timeout = "5s"
        event_loop = "{event_loop}"

        [queue]
        commit_window = "50ms"
        gc_interval = "1s"

        [log]
        level = "debug"
        format = "json"

        [[devices]]
        name = "fast-a"
        driver = "sim"
        interval = "20ms"
        jitter = 0.0
        count = 19
        points.v = {{ shape = "ramp", min = 0, max = 1000, period = "10s" }}

        [[devices]]
        name = "fast-b"
        driver = "sim"
        interval = "25ms"
        count = 9
        points.w = {{ shape = "walk", seed = 3 }}

        [[actuators]]
        name = "relay"
        driver = "log"

        [uplinks.archive]
        type = "jsonl"
        path = "{tmp_path / 'out.jsonl'}"
        batch = {BATCH}
        pause_file = "{tmp_path / 'pause'}"
        retry_max = "200ms"

        [[commands]]
        uplink = "local"
        action = "set_relay"
        actuator = "relay"
        actuator_action = "set"
        params.channel = {{ type = "int", min = 0, max = 7 }}
        params.on = {{ type = "bool" }}
    """) + health + extra
    path = tmp_path / "gatewayd.toml"
    path.write_text(text)
    return path


def committed(events: list[dict[str, Any]]) -> set[int]:
    out: set[int] = set()
    for e in events:
        if e.get("event") == "queue_committed":
            out.update(range(e["first_seq"], e["last_seq"] + 1))
    return out


def wait_delivered(out: Path, want: set[int], timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_jsonl_complete(out)
        if want <= {r["seq"] for r in rows}:
            return rows
        time.sleep(0.05)  # polling the archive file for a condition with a deadline
    missing = want - {r["seq"] for r in read_jsonl_complete(out)}
    raise AssertionError(f"{len(missing)} committed readings never delivered, e.g. {sorted(missing)[:5]}")


def read_jsonl_complete(path: Path) -> list[dict[str, Any]]:
    """Lines of the archive, ignoring a torn last line from a kill mid-write."""
    if not path.exists():
        return []
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    return [json.loads(x) for x in data.splitlines() if x.strip()]


@pytest.mark.parametrize("uplink_down", [False, True], ids=["uplink-up", "uplink-down"])
def test_sigkill_loses_no_committed_reading(tmp_path: Path, daemons: list[Daemon], uplink_down: bool) -> None:
    rng = random.Random(1234 + uplink_down)
    cfg = write_config(tmp_path)
    out = tmp_path / "out.jsonl"
    if uplink_down:
        (tmp_path / "pause").touch()
    log = tmp_path / "daemon.log"
    kills = 4
    events: list[dict[str, Any]] = []
    for _ in range(kills):
        d = Daemon(cfg, log).start()
        daemons.append(d)
        d.event("gateway_ready")
        target = rng.randint(3, 15)  # kill at a random commit during a steady stream
        seen = 0
        while seen < target:
            d.event("queue_committed")
            seen += 1
        d.kill()
        events += d.events
    before_restart = committed(events)
    assert len(before_restart) > kills * 100
    if uplink_down:
        assert read_jsonl_complete(out) == []  # nothing went out: all of it is backlog now
        (tmp_path / "pause").unlink()
    d = Daemon(cfg, log).start()
    daemons.append(d)
    d.event("gateway_ready")
    wait_delivered(out, before_restart)
    assert d.stop() == 0
    events += d.events
    rows = read_jsonl_complete(out)
    delivered = [r["seq"] for r in rows]
    every_commit = committed(events)
    assert every_commit <= set(delivered)  # the final graceful stop delivered its own too
    dupes = len(delivered) - len(set(delivered))
    assert dupes <= BATCH * kills, f"{dupes} duplicates for {kills} kills"
    firsts: list[int] = []
    seen_set: set[int] = set()
    for s in delivered:
        if s not in seen_set:
            seen_set.add(s)
            firsts.append(s)
    assert firsts == sorted(firsts), "delivery out of order"
    assert set(delivered) <= every_commit | set(range(1, max(every_commit) + 1))
    if uplink_down:
        assert dupes == 0
        flagged = {r["seq"] for r in rows if r["backlog"]}
        assert before_restart <= flagged  # queued while offline: sent as backlog


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_sigterm_flushes_and_exits_zero(tmp_path: Path, daemons: list[Daemon], event_loop: str) -> None:
    """On either event loop (uvloop is what "auto" picks where it is installed)."""
    if event_loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop has no wheel for this platform")
    cfg = write_config(tmp_path, event_loop=event_loop)
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    assert d.event("gateway_ready")["event_loop"] == event_loop
    for _ in range(5):
        d.event("queue_committed")
    t0 = time.monotonic()
    rc = d.stop(timeout=15)
    took = time.monotonic() - t0
    assert rc == 0
    assert took < 5 + 3, f"stop took {took:.1f}s, bound is stop_timeout (5s) plus start-up slack"
    names = [e.get("event") for e in d.events]
    assert names.index("gateway_stopping") < names.index("queue_closed") < names.index("gateway_stopped")
    con = sqlite3.connect(tmp_path / "state" / "queue.db")
    tail = int(con.execute("SELECT v FROM meta WHERE k='last_seq'").fetchone()[0])
    acked = con.execute("SELECT acked FROM cursors WHERE name='archive'").fetchone()[0]
    con.close()
    assert acked == tail  # every committed reading was delivered before exit
    delivered = {r["seq"] for r in read_jsonl_complete(tmp_path / "out.jsonl")}
    assert delivered == set(range(1, tail + 1))


def test_corrupt_database_at_start_is_moved_aside(tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "queue.db").write_bytes(b"\x00garbage, not sqlite" * 500)
    d = Daemon(write_config(tmp_path), tmp_path / "daemon.log").start()
    daemons.append(d)
    ev = d.event("queue_corrupt_renamed")
    assert Path(ev["moved_to"]).exists()
    d.event("gateway_ready")
    d.event("queue_committed")
    assert d.stop() == 0


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_metrics_status_and_local_commands(tmp_path: Path, daemons: list[Daemon]) -> None:
    port = free_port()
    cfg = write_config(tmp_path, health_port=port, extra=textwrap.dedent("""
        [[devices]]
        name = "broken"
        driver = "sim"
        interval = "50ms"
        points.x = { fail_every = 1 }
    """))
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    d.event("gateway_ready")
    d.find(lambda e: e.get("event") == "device_failing" and e.get("device") == "broken")
    base = f"http://127.0.0.1:{port}"
    code, body = _get(base + "/healthz")
    assert code == 200 and json.loads(body)["ok"] is True
    for _ in range(3):
        d.event("queue_committed")
    wait_delivered(tmp_path / "out.jsonl", committed(d.events))  # sent_total has its child now
    code, body = _get(base + "/metrics")
    text = body.decode()
    assert code == 200
    assert "gatewayd_readings_queued_total" in text
    assert 'gatewayd_device_read_failures_total{device="broken"}' in text
    assert 'gatewayd_backlog_rows{uplink="archive"}' in text
    assert 'gatewayd_readings_sent_total{uplink="archive"}' in text
    code, body = _get(base + "/status")
    status = json.loads(body)
    assert status["event_loop"] == choose_loop("auto")[0]  # uvloop where it is installed
    assert status["devices"]["broken"]["state"] == "failing"
    assert "simulated fault" in status["devices"]["broken"]["last_error"]
    assert status["devices"]["fast-a"]["state"] == "ok"
    assert status["uplinks"]["archive"]["state"] == "connected"
    code, res = _post(base + "/commands", {"action": "set_relay", "params": {"channel": 2, "on": True}})
    assert (code, res["ok"], res["code"]) == (200, True, 200)
    code, res = _post(base + "/commands", {"action": "set_relay", "params": {"channel": 9, "on": True}})
    assert (code, res["ok"], res["code"]) == (422, False, 400)
    code, res = _post(base + "/commands", {"action": "launch"})
    assert res["code"] == 404
    code, res = _post(base + "/commands", ["not", "an", "object"])
    assert code == 400
    code, body = _get(base + "/status")
    assert json.loads(body)["actuators"]["relay"]["last"] == [
        {"action": "set", "params": {"channel": 2, "on": True}}]
    assert d.stop() == 0


def test_systemd_notify_ready_watchdog_stopping(tmp_path: Path, daemons: list[Daemon]) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    try:
        d = Daemon(write_config(tmp_path), tmp_path / "daemon.log",
                   env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}).start()
        daemons.append(d)
        messages: list[str] = []

        def until(pred: Any) -> None:
            while not pred():
                messages.append(sock.recv(4096).decode())

        until(lambda: any(m.startswith("READY=1") for m in messages))
        until(lambda: sum(m == "WATCHDOG=1" for m in messages) >= 3)
        assert d.proc is not None
        d.proc.terminate()
        until(lambda: "STOPPING=1" in messages)
        assert d.stop() == 0
    finally:
        sock.close()
