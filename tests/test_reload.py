"""SIGHUP reloads the config under a steady stream without losing a reading: a device's interval
changes, a device is added, the uplink's address changes (it restarts on its kept cursor), an
invalid file is refused with located errors while the old config keeps running; systemd hears
RELOADING=1 then READY=1."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

from .conftest import Daemon
from .test_daemon import committed, read_jsonl_complete, wait_delivered, write_config


def _reload(d: Daemon, cfg: Path, text: str, sock: socket.socket) -> dict[str, Any]:
    cfg.write_text(text)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait_for(lambda e: e.get("event") in ("config_reloaded", "reload_failed"))
    got: list[str] = []
    while not any(m.startswith("READY=1") for m in got):
        got.append(sock.recv(4096).decode())
    assert got[0].startswith("RELOADING=1\nMONOTONIC_USEC="), got
    # A few commits on the new config: the stream goes on.
    for _ in range(3):
        d.event("queue_committed")
    return ev


def test_sighup_reloads_under_a_steady_stream(tmp_path: Path, daemons: list[Daemon]) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    try:
        cfg = write_config(tmp_path)
        original = cfg.read_text()
        d = Daemon(cfg, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": str(sock_path)}).start()
        daemons.append(d)
        d.event("gateway_ready")
        assert sock.recv(4096).decode().startswith("READY=1")
        for _ in range(3):
            d.event("queue_committed")

        # 1. A device's interval.
        text = original.replace('interval = "25ms"', 'interval = "40ms"')
        ev = _reload(d, cfg, text, sock)
        assert ev["event"] == "config_reloaded" and ev["devices_changed"] == ["fast-b"], ev
        assert "uplinks_changed" not in ev  # the uplink kept running

        # 2. A new device.
        text += '\n[[devices]]\nname = "fast-c"\ndriver = "sim"\ninterval = "30ms"\n' \
                'points.c = { shape = "ramp", min = 0, max = 10, period = "5s" }\n'
        ev = _reload(d, cfg, text, sock)
        assert ev["devices_added"] == ["fast-c"], ev
        d.wait_for(lambda e: e.get("event") == "queue_committed")

        # 3. The uplink's address (for jsonl, its file): it restarts on its cursor.
        old_out, new_out = tmp_path / "out.jsonl", tmp_path / "out2.jsonl"
        text = text.replace(f'path = "{old_out}"', f'path = "{new_out}"')
        ev = _reload(d, cfg, text, sock)
        assert ev["uplinks_changed"] == ["archive"] and "devices_changed" not in ev, ev

        # 4. An invalid file: located errors, nothing changes, the stream goes on.
        ev = _reload(d, cfg, text.replace('interval = "40ms"', 'interval = "soon"'), sock)
        assert ev["event"] == "reload_failed", ev
        assert any('devices[1].interval: expected a duration' in p and str(cfg) in p
                   for p in ev["problems"]), ev
        assert ev["level"] == "error"

        assert d.stop() == 0
        want = committed(d.events)
        rows = read_jsonl_complete(old_out) + wait_delivered(new_out, set(), 5)
        seqs = {r["seq"] for r in rows}
        assert want <= seqs, f"{len(want - seqs)} committed readings lost, e.g. {sorted(want - seqs)[:5]}"
        assert {r["device"] for r in read_jsonl_complete(new_out)} >= {"fast-a", "fast-b", "fast-c"}
        # The restarted uplink resumed from its cursor: the new file starts where the old one was
        # confirmed, not at the queue's start (at most the old session's unconfirmed batch again).
        first_new = min(r["seq"] for r in read_jsonl_complete(new_out))
        assert first_new > 1 and first_new <= max(r["seq"] for r in read_jsonl_complete(old_out)) + 1
    finally:
        sock.close()


def test_removed_uplink_keeps_its_cursor(tmp_path: Path, daemons: list[Daemon]) -> None:
    cfg = write_config(tmp_path)
    original = cfg.read_text()
    d = Daemon(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    d.event("gateway_ready")
    d.event("queue_committed")
    (tmp_path / "pause").touch()  # let a backlog build for the archive
    d.wait_for(lambda e: e.get("event") == "uplink_state" and e.get("state") == "backing_off")
    start = original.index("[uplinks.archive]")
    end = original.index("[[commands]]")
    without = original[:start] + '[uplinks.other]\ntype = "jsonl"\npath = "other.jsonl"\n\n' + \
        original[end:].replace('uplink = "local"', 'uplink = "local"')
    cfg.write_text(without)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait_for(lambda e: e.get("event") == "config_reloaded")
    assert ev["uplinks_removed"] == ["archive"] and ev["uplinks_added"] == ["other"], ev
    kept = d.find(lambda e: e.get("event") == "uplink_cursor_kept")
    assert kept["uplink"] == "archive" and kept["pending"] > 0 and kept["grace_s"] > 0
    assert not any(e.get("event") == "uplink_cursor_dropped" for e in d.events)
    # Put it back within the grace period: its backlog is delivered from where it stopped.
    (tmp_path / "pause").unlink()
    cfg.write_text(original)
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait_for(lambda e: e.get("event") == "config_reloaded")
    assert ev["uplinks_added"] == ["archive"], ev
    for _ in range(3):
        d.event("queue_committed")
    assert d.stop() == 0
    wait_delivered(tmp_path / "out.jsonl", committed(d.events), 10)


def test_changing_an_uplink_host_moves_delivery_without_a_loss(tmp_path: Path,
                                                               daemons: list[Daemon]) -> None:
    """An Operations Hub uplink pointed at another server: it restarts there on its cursor."""
    import contextlib
    import datetime
    import json
    import os
    import subprocess
    import sys
    import urllib.request
    from collections.abc import Iterator

    from .conftest import ROOT
    from .opshub.test_daemon import CONFIG

    @contextlib.contextmanager
    def opshub_sim() -> Iterator[str]:
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

    def stored(url: str) -> list[str]:
        with urllib.request.urlopen(f"{url}/sim/data?dc=OPS/gw-1/boiler1&limit=100000", timeout=5) as r:
            return [row["timestamp"] for row in json.loads(r.read())["rows"]]

    with opshub_sim() as a, opshub_sim() as b:
        archive = tmp_path / "archive.jsonl"
        text = CONFIG.format(url=a, gw="gw-1").replace('[gateway]\nid = "field-gw"', (
            '[gateway]\nid = "field-gw"\nstop_timeout = "10s"')).replace(
            '[log]\nformat = "json"', '[log]\nlevel = "debug"\nformat = "json"').replace(
            'interval = "100ms"', 'interval = "20ms"') + \
            f'\n[uplinks.archive]\ntype = "jsonl"\npath = "{archive}"\nlinger = "0s"\n'
        cfg = tmp_path / "gw.toml"
        cfg.write_text(text)
        d = Daemon(cfg, tmp_path / "daemon.log", env={"OPSHUB_PASSWORD": "field-pw"}).start()
        daemons.append(d)
        d.event("gateway_ready")
        d.wait_for(lambda e: e.get("event") == "uplink_state" and e.get("uplink") == "hub"
                   and e.get("state") == "connected")
        for _ in range(5):
            d.event("queue_committed")
        cfg.write_text(text.replace(f'url = "{a}"', f'url = "{b}"'))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        ev = d.wait_for(lambda e: e.get("event") == "config_reloaded")
        assert ev["uplinks_changed"] == ["hub"], ev
        for _ in range(5):
            d.event("queue_committed")
        assert d.stop() == 0
        sampled = {r["ts_ms"] for r in read_jsonl_complete(archive) if r["device"] == "boiler"}
        in_a, in_b = stored(a), stored(b)
        assert in_a and in_b  # delivery moved from the first server to the second
        got = {int(datetime.datetime.fromisoformat(t).timestamp() * 1000 + 0.5) for t in in_a + in_b}
        assert sampled and sampled <= got, f"{len(sampled - got)} readings lost across the move"
