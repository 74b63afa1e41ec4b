"""Logs carry the journald priority: a PRIORITY field in every JSON line and, when stdout is the
journal's stream (JOURNAL_STREAM), the `<N>` prefix journald turns into the entry's priority,
so `journalctl -p warning` keeps warnings and errors and drops info and debug."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import structlog

from gatewayd import logs

from .conftest import ROOT

# journald's rule for a stream line (SyslogLevelPrefix=yes): "<N>" with N in 0..7 at the start.
_PREFIX = re.compile(rb"^<([0-7])>")


def _journald_priority(line: bytes) -> tuple[int, bytes]:
    m = _PREFIX.match(line)
    return (int(m.group(1)), line[m.end():]) if m else (6, line)  # no prefix: LOG_INFO


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(textwrap.dedent(f"""
        [gateway]
        id = "log-gw"
        state_dir = "{tmp_path / 'state'}"
        [log]
        level = "debug"
        format = "json"
        [health]
        enabled = false
        [[devices]]
        name = "gone"
        driver = "nmea"
        port = "{tmp_path / 'no-such-tty'}"
        interval = "50ms"
        timeout = "200ms"
        [uplinks.archive]
        type = "jsonl"
        path = "{tmp_path / 'out.jsonl'}"
    """))
    return p


def _run_until_warning(tmp_path: Path, journal: bool) -> list[bytes]:
    out_path = tmp_path / ("journal.log" if journal else "plain.log")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JOURNAL_STREAM", None)
    with out_path.open("wb") as out:
        if journal:
            st = os.fstat(out.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "-c", str(_config(tmp_path))],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        # The missing port gives a warning; wait for it (and for ready) as the log grows.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = out_path.read_bytes()
            if b'"warning"' in text and b"gateway_ready" in text:
                break
            try:
                proc.wait(0.02)  # polling the log file; the log line is the sync point
                raise AssertionError(out_path.read_text())
            except subprocess.TimeoutExpired:
                pass
        else:
            raise AssertionError(out_path.read_text()[-2000:])
    finally:
        proc.terminate()
        proc.wait(20)
    return out_path.read_bytes().splitlines()


def test_journal_stream_lines_carry_the_priority_prefix(tmp_path: Path) -> None:
    lines = [ln for ln in _run_until_warning(tmp_path, journal=True) if ln.strip()]
    kept = {"warning": 0, "info": 0, "debug": 0}
    for line in lines:
        prio, rest = _journald_priority(line)
        assert _PREFIX.match(line), line  # every line: journald never falls back to LOG_INFO
        event = json.loads(rest)
        assert event["PRIORITY"] == prio
        level = event["level"]
        assert prio == logs.PRIORITIES[level]
        if level in kept:
            kept[level] += 1
        if prio <= 4:  # what `journalctl -p warning` shows
            assert level in ("warning", "error", "critical"), event
    assert kept["warning"] >= 1 and kept["info"] >= 1, kept


def test_plain_json_lines_carry_priority_without_prefix(tmp_path: Path) -> None:
    lines = [ln for ln in _run_until_warning(tmp_path, journal=False) if ln.strip()]
    events = [json.loads(ln) for ln in lines]  # no prefix: each line is plain JSON
    assert {e["level"]: e["PRIORITY"] for e in events}.items() >= {"warning": 4, "info": 6}.items()


def test_journal_stream_must_match_stdout(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.on_journal_stream(a, env)
        assert not logs.on_journal_stream(b, env)  # stdout redirected elsewhere: no prefix
        assert not logs.on_journal_stream(a, {"JOURNAL_STREAM": "junk"})
        assert not logs.on_journal_stream(io.StringIO(), env)


def test_error_and_exception_map_to_err() -> None:
    ev = logs.add_priority(None, "exception", {"event": "x", "level": "error"})
    assert ev["PRIORITY"] == 3
    assert logs.add_priority(None, "warning", {"event": "x"})["PRIORITY"] == 4
    structlog.reset_defaults()
