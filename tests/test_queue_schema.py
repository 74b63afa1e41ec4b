"""Queue schema versioning: `PRAGMA user_version` and ordered migrations; a newer schema than
the code knows refuses to start (exit 73) and is left untouched."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gatewayd.errors import QueueSchemaError
from gatewayd.queue import SCHEMA_VERSION, Queue, QueueConfig

from .conftest import ROOT

CFG = QueueConfig(commit_window=0.01, gc_interval=3600)

# The layout every queue.db had before versioning (user_version 0), verbatim.
_TODAY = """
CREATE TABLE IF NOT EXISTS series(sid INTEGER PRIMARY KEY, dev TEXT NOT NULL,
                                  pt TEXT NOT NULL, UNIQUE(dev, pt));
CREATE TABLE IF NOT EXISTS readings(seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL,
    sid INTEGER NOT NULL, val, vt INTEGER NOT NULL, q INTEGER NOT NULL,
    off INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cursors(name TEXT PRIMARY KEY, bit INTEGER NOT NULL,
                                   acked INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v);
"""


def moved_aside(d: Path) -> list[Path]:
    return list(d.glob("queue.db.corrupt-*"))


def _today_db(path: Path, rows: int, acked: int) -> None:
    now = int(time.time() * 1000)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(_TODAY)
    con.execute("INSERT INTO series VALUES (1, 'boiler', 'temp_c'), (2, 'boiler', 'state')")
    con.executemany("INSERT INTO readings VALUES (?,?,?,?,?,?,?)",
                    [(i, now + i, 1 + i % 2, float(i) if i % 2 == 0 else f"s{i}", 0, 0, 1)
                     for i in range(1, rows + 1)])
    con.execute("INSERT INTO cursors VALUES ('a', 0, ?)", (acked,))
    con.execute("INSERT INTO meta VALUES ('last_seq', ?)", (rows,))
    con.close()


async def test_todays_schema_migrates_with_its_backlog_intact(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    _today_db(db, 1000, 300)
    with capture_logs() as logs:
        q = Queue(db, CFG, ["a"])
        await q.open()
        try:
            assert q.rows == 1000 and q.tail == 1000
            ob = q.outbox("a")
            assert ob.acked == 300 and ob.pending() == 700
            lease = await ob.lease(10_000, wait_s=1)
            assert [i.seq for i in lease.items] == list(range(301, 1001))
            assert lease.items[0].reading.device == "boiler"
            assert lease.items[0].reading.value == "s301" and lease.items[1].reading.value == 302.0
            assert all(i.backlog for i in lease.items)  # queued while offline (off bit 0)
        finally:
            await q.close()
    migrated = [e for e in logs if e["event"] == "queue_schema_migrated"]
    assert migrated and migrated[0]["from_version"] == 0
    assert migrated[0]["to_version"] == SCHEMA_VERSION
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    meta = dict(con.execute("SELECT k, v FROM meta"))
    assert len(meta["queue_id"]) == 32 and int(meta["last_seq"]) == 1000
    assert con.execute("SELECT count(*) FROM readings").fetchone()[0] == 1000
    con.close()
    assert not moved_aside(tmp_path)


async def test_new_database_starts_at_the_current_version(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue.db", CFG, ["a"])
    await q.open()
    await q.close()
    con = sqlite3.connect(tmp_path / "queue.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def _newer(db: Path) -> bytes:
    _today_db(db, 50, 0)
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return db.read_bytes()


async def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    before = _newer(db)
    q = Queue(db, CFG, ["a"])
    with pytest.raises(QueueSchemaError, match="newer than this gatewayd"):
        await q.open()
    await q.close()
    assert db.read_bytes() == before
    assert not moved_aside(tmp_path)


def test_daemon_refuses_a_newer_schema_with_exit_73(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    before = _newer(state / "queue.db")
    cfg = tmp_path / "gatewayd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [gateway]
        id = "schema-gw"
        state_dir = "{state}"
        [health]
        enabled = false
        [log]
        format = "json"
        [[devices]]
        name = "d"
        driver = "sim"
        points.v = {{ shape = "sine" }}
        [uplinks.archive]
        type = "jsonl"
        path = "{tmp_path / 'out.jsonl'}"
    """))
    proc = subprocess.run([sys.executable, "-m", "gatewayd", "run", "-c", str(cfg)], cwd=ROOT,
                          capture_output=True, timeout=60)
    assert proc.returncode == 73, proc.stderr
    assert b"newer than this gatewayd" in proc.stderr
    assert b"queue_schema_too_new" in proc.stdout
    assert (state / "queue.db").read_bytes() == before
    assert not list(state.glob("queue.db.corrupt-*"))
