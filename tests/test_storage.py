"""Storage faults and state loss on real filesystems: a small tmpfs filled to ENOSPC, a
read-only remount, a 0-byte / missing database and a deleted WAL after SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from drivers.base import Reading
from gatewayd.metrics import Metrics
from gatewayd.queue import Queue, QueueConfig

from .conftest import ROOT, Daemon, free_port, read_jsonl

CFG = QueueConfig(commit_window=0.01, gc_interval=3600)


NOW_MS = int(time.time() * 1000)


def readings(n: int, start: int = 0) -> list[Reading]:
    return [Reading("dev", "p", float(start + i), NOW_MS + start + i) for i in range(n)]


def remove_state(db: Path, keep_db: bool = False) -> None:
    for suffix in ("-wal", "-shm") if keep_db else ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)


@asynccontextmanager
async def opened(path: Path, uplinks: list[str], cfg: QueueConfig = CFG,
                 **kw: Any) -> AsyncIterator[Queue]:
    q = Queue(path, cfg, uplinks, **kw)
    await q.open()
    task = asyncio.create_task(q.run(), name="queue-run")
    try:
        yield q
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await q.close()


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (the tests run as root, in CI too)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def fill(mnt: Path) -> Path:
    """Fill the filesystem until ENOSPC; returns the filler file (delete it to free space)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)
    return filler


def truncate_wal(db: Path) -> None:
    """Checkpoint the WAL into the database and truncate it to 0 bytes (from outside), so the
    next write must allocate new space."""
    con = sqlite3.connect(db)
    try:
        busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        con.close()
    assert os.path.getsize(str(db) + "-wal") == 0


def truncate_to_zero(db: Path) -> None:
    db.write_bytes(b"")


def wal_size(db: Path) -> int:
    return Path(str(db) + "-wal").stat().st_size


# -- the queue on a full disk -------------------------------------------------------------------


async def test_enospc_during_ack_keeps_the_ack_and_writes_it_later(tmpfs: Path) -> None:
    db = tmpfs / "queue.db"
    metrics = Metrics()
    async with opened(db, ["a"], metrics=metrics) as q:
        q.probe_s = 0.05
        assert await q.put(readings(500))
        truncate_wal(db)
        filler = fill(tmpfs)
        ob = q.outbox("a")
        with capture_logs() as logs:
            await ob.ack(300)  # the cursor write hits ENOSPC: never raised into the uplink
            assert q.storage.state == "disk_full" and q.storage.where == "ack"
            assert ob.acked == 300 and ob.pending() == 200  # delivery goes on from memory
            await ob.ack(400)  # kept in memory, no second write attempt, no second log line
            assert metrics.queue_storage_ok._value.get() == 0
            assert not await q.put(readings(10, 500))  # readings wait in memory
            assert q.storage.held == 10
            filler.unlink()
            async with asyncio.timeout(10):
                while not q.storage.ok:
                    await q.wait_committed(q.tail, 0.05)
        events = [e["event"] for e in logs]
        assert events.count("queue_storage_degraded") == 1
        assert events.count("queue_storage_recovered") == 1
        assert metrics.queue_storage_ok._value.get() == 1
        assert q.tail == 510  # the held readings were committed after recovery
    con = sqlite3.connect(db)
    assert con.execute("SELECT acked FROM cursors WHERE name='a'").fetchone()[0] == 400
    assert con.execute("SELECT count(*) FROM readings").fetchone()[0] == 510
    con.close()


async def test_enospc_on_the_commit_carrying_a_waiting_confirmation_keeps_it(tmpfs: Path) -> None:
    """A confirmation through the tail waits for the next commit; when that commit hits ENOSPC
    the confirmation is kept (counted as an ack pending) and written once the disk recovers."""
    db = tmpfs / "queue.db"
    async with opened(db, ["a"]) as q:
        q.probe_s = 0.05
        assert await q.put(readings(100))
        ob = q.outbox("a")
        await ob.ack(100)  # through the tail: waits for the next commit
        assert q.storage.acks_pending == 0  # waiting is not a fault
        truncate_wal(db)
        filler = fill(tmpfs)
        with capture_logs() as logs:
            assert not await q.put(readings(10, 100))  # the commit fails: both held in memory
            assert q.storage.state == "disk_full"
            assert q.storage.acks_pending == 1 and q.storage.held == 10
            assert ob.acked == 100 and ob.pending() == 0  # delivery goes on from memory
            filler.unlink()
            async with asyncio.timeout(10):
                while not q.storage.ok or q.storage.acks_pending or q.storage.held:
                    await q.wait_committed(q.tail, 0.05)
        events = [e["event"] for e in logs]
        assert events.count("queue_storage_degraded") == 1
        con = sqlite3.connect(db)
        assert con.execute("SELECT acked FROM cursors WHERE name='a'").fetchone()[0] == 100
        assert con.execute("SELECT count(*) FROM readings").fetchone()[0] == 110
        con.close()


async def test_enospc_during_append_holds_bounded_buffer_and_counts_drops(tmpfs: Path) -> None:
    db = tmpfs / "queue.db"
    metrics = Metrics()
    cfg = replace(CFG, memory_buffer=3000)
    async with opened(db, ["a"], cfg, metrics=metrics) as q:
        q.probe_s = 0.05
        assert await q.put(readings(100))
        truncate_wal(db)
        filler = fill(tmpfs)
        assert not await q.put(readings(2000, 100))  # the commit hits ENOSPC
        assert q.storage.state == "disk_full" and q.storage.where == "append"
        for i in range(3):
            assert not await q.put(readings(1000, 2100 + i * 1000))
        assert q.storage.held == 3000  # bounded
        assert q.store_failed == 2000  # the oldest that did not fit, counted
        assert metrics.store_failures.labels("disk_full")._value.get() == 2000
        assert metrics.readings_dropped.labels("a", "disk_full")._value.get() == 2000
        assert q.outbox("a").dropped == {"disk_full": 2000}
        filler.unlink()
        async with asyncio.timeout(10):
            while q.tail < 100 + 3000:
                await q.wait_committed(q.tail, 0.1)
        assert q.storage.ok and q.storage.held == 0
        lease = await q.outbox("a").lease(10_000, wait_s=1)
        values = [i.reading.value for i in lease.items]
        assert values == [float(v) for v in range(100)] + [float(v) for v in range(2100, 5100)]
        assert [i.seq for i in lease.items] == list(range(1, 3101))  # no gap, no reuse


# -- state loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["zero-byte", "missing"])
async def test_lost_database_is_loud_counted_and_seqs_continue(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "queue.db"
    async with opened(db, ["a"]) as q:
        assert await q.put(readings(1000))
        await q.outbox("a").ack(200)  # delivered: not counted as lost
        await q.gc_pass()
    remove_state(db)
    if damage == "zero-byte":
        truncate_to_zero(db)
    metrics = Metrics()
    with capture_logs() as logs:
        async with opened(db, ["a"], metrics=metrics) as q:
            assert await q.put(readings(5, 1000))
            lease = await q.outbox("a").lease(100, wait_s=1)
    lost = [e for e in logs if e["event"] == "queue_state_lost"]
    assert len(lost) == 1 and lost[0]["log_level"] == "error"
    assert lost[0]["lost"] == 800
    assert metrics.state_lost._value.get() == 800
    assert q.state_lost == 800
    seqs = [i.seq for i in lease.items]
    assert len(seqs) == 5 and min(seqs) > 1000  # never a seq of the lost readings
    assert q.rows == 5


_KILLED_WRITER = textwrap.dedent("""
    import asyncio, os, signal, sys, time
    from drivers.base import Reading
    from gatewayd.queue import Queue, QueueConfig

    async def main():
        q = Queue(sys.argv[1], QueueConfig(commit_window=0.01, gc_interval=3600), ["a"])
        now = int(time.time() * 1000)
        await q.open()
        runner = asyncio.create_task(q.run())
        for i in range(30):
            await q.put([Reading("dev", "p", float(i * 100 + j), now + i * 100 + j) for j in range(100)])
        await q.gc_pass()  # the sidecar's committed mark: 3000
        for i in range(30, 40):
            await q.put([Reading("dev", "p", float(i * 100 + j), now + i * 100 + j) for j in range(100)])
        print(q.tail, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        await runner

    asyncio.run(main())
""")


async def test_deleted_wal_after_sigkill_is_loud_and_seqs_never_reused(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_WRITER, str(db), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert int(out.splitlines()[-1]) == 4000
    assert wal_size(db) > 0  # the commits live in the WAL: no checkpoint happened
    remove_state(db, keep_db=True)
    metrics = Metrics()
    with capture_logs() as logs:
        async with opened(db, ["a"], metrics=metrics) as q:
            db_rows = q.rows
            assert await q.put(readings(3, 10_000))
            lease = await q.outbox("a").lease(10_000, wait_s=1)
    lost = [e for e in logs if e["event"] == "queue_state_lost"]
    assert len(lost) == 1, logs
    assert lost[0]["lost"] == 3000 - db_rows >= 1  # at least the readings under the mark
    assert metrics.state_lost._value.get() == lost[0]["lost"]
    new = [i.seq for i in lease.items if i.reading.value >= 10_000]
    assert len(new) == 3 and min(new) > 4000  # above every seq the killed run handed out


async def test_clean_restart_reports_no_loss_and_keeps_numbering(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    async with opened(db, ["a"]) as q:
        assert await q.put(readings(50))
    with capture_logs() as logs:
        async with opened(db, ["a"]) as q:
            assert await q.put(readings(1, 50))
            assert q.tail == 51
    assert not [e for e in logs if e["event"] in ("queue_state_lost", "queue_seq_skipped")]
    side = json.loads((tmp_path / "queue.state").read_bytes())
    assert side["clean"] is True and side["committed"] == 51 and side["queue_id"] == q.queue_id


# -- the daemon on a full and a read-only state directory -----------------------------------------


def _config(tmp_path: Path, state: Path, port: int, buffer: int) -> Path:
    text = textwrap.dedent(f"""
        [gateway]
        id = "storage-gw"
        state_dir = "{state}"
        stop_timeout = "5s"

        [queue]
        commit_window = "20ms"
        gc_interval = "200ms"
        memory_buffer = {buffer}

        [log]
        level = "info"
        format = "json"

        [health]
        listen = "127.0.0.1:{port}"

        [[devices]]
        name = "fast"
        driver = "sim"
        interval = "10ms"
        jitter = 0.0
        count = 19
        points.v = {{ shape = "ramp", min = 0, max = 1000, period = "10s" }}

        [uplinks.archive]
        type = "jsonl"
        path = "{tmp_path / 'out.jsonl'}"
        batch = 500
        linger = "20ms"
        pause_file = "{tmp_path / 'pause'}"
        retry_max = "100ms"
    """)
    path = tmp_path / "gatewayd.toml"
    path.write_text(text)
    return path


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def _until(base: str, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Poll /status until `pred(status)` holds; the deadline is only a failure bound."""
    deadline = time.monotonic() + timeout
    while True:
        status = _get(base + "/status")[1]
        if pred(status):
            return status
        assert time.monotonic() < deadline, f"condition never held; last status: {status['queue']}"
        time.sleep(0.05)  # polling an HTTP condition with a deadline


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_daemon_survives_full_disk_and_recovers(tmp_path: Path, tmpfs: Path,
                                                daemons: list[Daemon]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "pause").touch()  # the cloud is down: a backlog builds on the small disk
    d = Daemon(_config(tmp_path, tmpfs / "state", port, 2000), tmp_path / "daemon.log").start()
    daemons.append(d)
    d.event("gateway_ready")
    d.wait_for(lambda e: e.get("event") == "uplink_state" and e.get("state") == "backing_off")
    assert _metric(_get(base + "/metrics")[1], "gatewayd_queue_storage_ok") == 1
    _until(base, lambda s: s["queue"]["tail_seq"] > 1000)  # a backlog on disk
    filler = fill(tmpfs)
    ev = d.event("queue_storage_degraded", timeout=60)  # the WAL outgrows what is left
    assert ev["condition"] == "disk_full"
    code, body = _get(base + "/readyz")
    assert code == 503 and any("disk_full" in r for r in body["reasons"])
    code, body = _get(base + "/healthz")
    assert code == 200 and body["degraded"]  # alive: liveness is not readiness
    (tmp_path / "pause").unlink()  # the cloud returns: acks now meet the full disk
    d.wait_for(lambda e: e.get("event") == "uplink_state" and e.get("state") == "connected")
    deadline_status = _until(base, lambda s: s["queue"]["storage"]["dropped"] > 0
                             and s["queue"]["storage"]["acks_pending"] > 0)
    st = deadline_status["queue"]["storage"]
    assert st["state"] == "disk_full" and st["held"] == 2000 and st["dropped"] > 0
    assert st["acks_pending"] == 1  # confirmed deliveries kept in memory
    text = _get(base + "/metrics")[1]
    assert _metric(text, "gatewayd_queue_storage_ok") == 0
    assert _metric(text, 'gatewayd_queue_store_failures_total{reason="disk_full"}') > 0
    filler.unlink()
    rec = d.event("queue_storage_recovered", timeout=30)
    assert rec["held_in_memory"] > 0
    names = [e["event"] for e in d.events]
    # One line per condition change, never per write (GC may free WAL space and flap once).
    assert names.count("queue_storage_degraded") == names.count("queue_storage_recovered")
    assert _get(base + "/readyz")[0] == 200
    assert d.stop() == 0
    con = sqlite3.connect(tmpfs / "state" / "queue.db")
    tail = int(con.execute("SELECT v FROM meta WHERE k='last_seq'").fetchone()[0])
    acked = con.execute("SELECT acked FROM cursors WHERE name='archive'").fetchone()[0]
    con.close()
    assert acked == tail  # every ack written, the held readings committed and delivered
    delivered = [r["seq"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert set(delivered) == set(range(1, tail + 1))


def test_daemon_starts_degraded_on_read_only_state_dir(tmp_path: Path, tmpfs: Path,
                                                       daemons: list[Daemon]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tmpfs / "state"
    state.mkdir()
    _mount("-o", "remount,ro", str(tmpfs))
    d = Daemon(_config(tmp_path, state, port, 500), tmp_path / "daemon.log").start()
    daemons.append(d)
    ev = d.event("queue_storage_degraded")
    assert ev["at_start"] is True and ev["condition"] == "read_only"
    assert ev["level"] == "error"
    d.event("gateway_ready")
    code, body = _get(base + "/readyz")
    assert code == 503 and any("read_only" in r for r in body["reasons"])
    assert _get(base + "/healthz")[0] == 200
    # The sampler keeps sampling: the buffer fills, the excess is counted.
    status = _until(base, lambda s: s["queue"]["storage"]["dropped"] > 0)
    assert status["queue"]["storage"]["held"] == 500
    assert _metric(_get(base + "/metrics")[1],
                   'gatewayd_queue_store_failures_total{reason="read_only"}') > 0
    _mount("-o", "remount,rw", str(tmpfs))
    d.event("queue_storage_recovered", timeout=30)
    d.find(lambda e: e.get("event") == "queue_opened" and e.get("after_degraded_start"))
    assert _get(base + "/readyz")[0] == 200
    assert d.stop() == 0
    delivered = {r["seq"] for r in read_jsonl(tmp_path / "out.jsonl")}
    con = sqlite3.connect(state / "queue.db")
    tail = int(con.execute("SELECT v FROM meta WHERE k='last_seq'").fetchone()[0])
    con.close()
    assert tail >= 500 and delivered == set(range(1, tail + 1))  # the held 500 went out first
