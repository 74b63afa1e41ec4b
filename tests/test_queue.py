"""The durable queue on real SQLite files: order, cursors, caps, GC, corruption, disk full."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from drivers.base import Reading
from gatewayd.metrics import Metrics
from gatewayd.queue import Queue, QueueConfig

CFG = QueueConfig(commit_window=0.01, gc_interval=3600)


NOW_MS = int(time.time() * 1000)


def readings(n: int, start: int = 0, ts: int = NOW_MS) -> list[Reading]:
    return [Reading(f"dev{i % 3}", "p", float(start + i), ts + start + i) for i in range(n)]


@asynccontextmanager
async def opened(path: Path, uplinks: list[str], cfg: QueueConfig = CFG, **kw: object) -> AsyncIterator[Queue]:
    q = Queue(path, cfg, uplinks, **kw)  # type: ignore[arg-type]
    await q.open()
    task = asyncio.create_task(q.run(), name="queue-run")
    try:
        yield q
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await q.close()


async def test_put_lease_ack_in_order_and_resume_after_restart(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["a", "b"]) as q:
        assert await q.put(readings(10))
        assert await q.put([Reading("d", "s", "text", 1), Reading("d", "b", True, 2),
                            Reading("d", "j", {"x": [1, 2]}, 3), Reading("d", "n", None, 4, 2)])
        ob = q.outbox("a")
        lease = await ob.lease(4, wait_s=1)
        assert [i.seq for i in lease.items] == [1, 2, 3, 4]
        assert [i.reading.value for i in lease.items] == [0.0, 1.0, 2.0, 3.0]
        lease2 = await ob.lease(100, wait_s=1)  # pipelined: the next lease continues
        assert lease2.items[0].seq == 5
        assert [i.reading.value for i in lease2.items[-4:]] == ["text", True, {"x": [1, 2]}, None]
        assert lease2.items[-1].reading.quality == 2
        await ob.ack(4)  # only the first batch was confirmed
        assert ob.pending() == 10
    async with opened(db, ["a", "b"]) as q:
        ob = q.outbox("a")
        lease = await ob.lease(100, wait_s=1)
        assert lease.items[0].seq == 5  # unconfirmed items come again after a restart
        assert all(i.backlog for i in lease.items)  # queued before this run: backlog
        assert q.outbox("b").pending() == 14  # b never acked: nothing lost for it
        await q.put(readings(1, 100))
        assert q.tail == 15  # seq keeps growing


async def test_lease_waits_for_commit_and_rewind(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["a"]) as q:
        ob = q.outbox("a")
        empty = await ob.lease(10, wait_s=0.05)
        assert empty.items == []
        waiter = asyncio.create_task(ob.lease(10, wait_s=5))
        await q.put(readings(3))
        got = await waiter
        assert [i.seq for i in got.items] == [1, 2, 3]
        ob.rewind()
        again = await ob.lease(10, wait_s=1)
        assert [i.seq for i in again.items] == [1, 2, 3]


async def test_max_bytes_per_lease(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["a"]) as q:
        await q.put([Reading("d", "s", "x" * 1000, i) for i in range(10)])
        lease = await q.outbox("a").lease(100, max_bytes=3500, wait_s=1)
        assert len(lease.items) == 3


async def test_new_uplink_starts_now_or_oldest_and_removed_cursor_dropped(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        await q.put(readings(5))
    async with opened(db, ["a", "late", "full"], starts={"full": "oldest"}) as q:
        assert q.outbox("late").pending() == 0
        assert q.outbox("full").pending() == 5
        assert q.outbox("a").pending() == 5
    async with opened(db, ["late"]) as q:
        assert set(q.outboxes) == {"late"}
    con = sqlite3.connect(db)
    assert [r[0] for r in con.execute("SELECT name FROM cursors")] == ["late"]
    con.close()


async def test_backlog_flags_offline_and_before_connect(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["a", "b"]) as q:
        a, b = q.outbox("a"), q.outbox("b")
        await q.put(readings(2))  # both offline
        a.set_connected(True)
        await q.put(readings(2, 2))  # a online, b offline
        la = await a.lease(10, wait_s=1)
        lb = await b.lease(10, wait_s=1)
        assert [i.backlog for i in la.items] == [True, True, False, False]
        assert [i.backlog for i in lb.items] == [True, True, True, True]
        a.set_connected(False)
        a.set_connected(True)  # a reconnect: everything older is backlog now
        a.rewind()
        la = await a.lease(10, wait_s=1)
        assert all(i.backlog for i in la.items)


async def test_gc_deletes_rows_every_uplink_acked(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["a", "b"]) as q:
        await q.put(readings(100))
        await q.outbox("a").ack(80)
        await q.outbox("b").ack(30)
        assert await q.collect() == 30
        assert q.rows == 70 and q.head == 31
        await q.outbox("b").ack(100)
        assert await q.collect() == 50
        assert q.rows == 20
        lease = await q.outbox("a").lease(100, wait_s=1)
        assert [i.seq for i in lease.items] == list(range(81, 101))


async def test_max_rows_drops_oldest_and_counts_per_uplink(tmp_path: Path) -> None:
    metrics = Metrics()
    cfg = replace(CFG, max_rows=1000)
    async with opened(tmp_path / "q.db", ["a", "b"], cfg, metrics=metrics) as q:
        await q.outbox("a").ack(0)
        with capture_logs() as logs:
            await q.put(readings(1000))
            await q.outbox("a").ack(300)  # a confirmed 300; b nothing
            await q.put(readings(500, 1000))
        assert q.rows == 1000
        assert q.head == 501
        assert q.outbox("a").dropped == {"max_rows": 200}
        assert q.outbox("b").dropped == {"max_rows": 500}
        assert metrics.readings_dropped.labels("b", "max_rows")._value.get() == 500
        assert any(e["event"] == "queue_dropped_oldest" and e["uplink"] == "b" for e in logs)
        lease = await q.outbox("b").lease(10, wait_s=1)
        assert lease.items[0].seq == 501  # delivery goes on from the oldest kept row


async def test_max_age_drops_old_rows(tmp_path: Path) -> None:
    now = int(time.time() * 1000)  # not the import-time NOW_MS: a long suite makes it old
    cfg = replace(CFG, max_age=60)
    async with opened(tmp_path / "q.db", ["a"], cfg) as q:
        await q.put([Reading("d", "p", 1.0, now - 120_000 + i) for i in range(10)])
        await q.put([Reading("d", "p", 1.0, now + i) for i in range(5)])
        assert await q.enforce_caps() == 10
        assert q.outbox("a").dropped == {"max_age": 10}
        assert q.rows == 5


async def test_max_bytes_drops_oldest(tmp_path: Path) -> None:
    cfg = replace(CFG, max_bytes=100_000)
    async with opened(tmp_path / "q.db", ["a"], cfg) as q:
        for i in range(10):
            await q.put([Reading("d", "s", "y" * 200, NOW_MS + i * 100 + j) for j in range(100)])
        assert q.bytes_est <= 100_000
        dropped = q.outbox("a").dropped["max_bytes"]
        assert dropped + q.rows == 1000
        assert 400 <= q.rows < 1000


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def test_memory_flat_while_backlog_grows_past_cap(tmp_path: Path) -> None:
    cfg = replace(CFG, max_rows=100_000)
    async with opened(tmp_path / "q.db", ["a"], cfg) as q:
        batch = 10_000
        for i in range(10):
            await q.put(readings(batch, i * batch))
        base = _rss_kb()
        for i in range(10, 40):  # 300k more rows, 3x the cap
            await q.put(readings(batch, i * batch))
        grown = _rss_kb() - base
        assert q.rows == 100_000
        assert q.outbox("a").dropped["max_rows"] == 300_000
        assert grown < 15_000, f"RSS grew by {grown} KiB while the queue stayed at its cap"


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100,
                                     b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + b"\xff" * 2000])
async def test_corrupt_file_is_renamed_and_fresh_one_started(tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "q.db"
    db.write_bytes(content)
    with capture_logs() as logs:
        async with opened(db, ["a"]) as q:
            assert await q.put(readings(3))
            assert q.renamed_corrupt is not None and q.renamed_corrupt.exists()
    assert any(e["event"] == "queue_corrupt_renamed" for e in logs)
    assert q.renamed_corrupt.read_bytes() == content  # kept aside for a post-mortem


async def test_truncated_database_is_renamed(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        for i in range(20):
            await q.put(readings(1000, i * 1000))
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    async with opened(db, ["a"]) as q:
        assert q.renamed_corrupt is not None
        assert await q.put(readings(3))
        assert q.rows == 3


async def test_disk_full_is_survived_and_recovers(tmp_path: Path) -> None:
    metrics = Metrics()
    cfg = replace(CFG, max_file_size=256 * 1024, memory_buffer=2000, max_rows=1_000_000)
    async with opened(tmp_path / "q.db", ["a"], cfg, metrics=metrics) as q:
        results = []
        with capture_logs() as logs:
            for i in range(50):
                results.append(await q.put(readings(1000, i * 1000)))
                if results.count(False) == 3:
                    break
        assert results.count(False) == 3, "the file cap was never reached"
        assert q.store_error == "disk_full"
        assert [e["event"] for e in logs].count("queue_storage_degraded") == 1  # once, not per write
        failed_rows = q.store_failed
        assert failed_rows > 0  # beyond the memory buffer, and counted
        assert metrics.store_failures.labels("disk_full")._value.get() == failed_rows
        # Space returns: the uplink confirms everything, GC frees pages, writes resume.
        ob = q.outbox("a")
        await ob.ack(q.tail)
        while await q.collect():
            pass
        assert await q.put(readings(10, 10**6))
        assert q.store_error == ""
        lease = await ob.lease(100_000, wait_s=1)
        # The held readings were written first, then the new ones.
        assert len(lease.items) == 2000 + 10
        assert lease.items[-1].reading.value == float(10**6 + 9)


async def test_concurrent_flushes_never_reuse_a_seq(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["a"]) as q:
        futs = []
        for i in range(20):
            futs.append(q.submit(readings(100, i * 100)))
            futs.append(asyncio.ensure_future(q.flush()))  # shutdown's flush racing the loop
            await asyncio.sleep(0)  # let that flush take the window and enter the writer thread
        await asyncio.gather(*futs)
        assert q.store_error == "" and q.store_failed == 0
        lease = await q.outbox("a").lease(10_000, wait_s=1)
        assert [i.seq for i in lease.items] == list(range(1, 2001))
        assert [i.reading.value for i in lease.items] == [float(v) for v in range(2000)]


# -- confirmations through the tail ride on the next commit ----------------------------------


def _cursor(db: Path, name: str) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT acked FROM cursors WHERE name=?", (name,)).fetchone()[0]
    finally:
        con.close()


def _writer_jobs(q: Queue) -> list[str]:
    """Record the name of every job the writer thread runs from now on."""
    names: list[str] = []
    call = q._w.call

    def spy(fn, *args):  # type: ignore[no-untyped-def]
        names.append(getattr(fn, "__name__", repr(fn)))
        return call(fn, *args)

    q._w.call = spy  # type: ignore[method-assign]
    return names


async def test_confirmation_through_the_tail_is_written_by_the_next_commit(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        ob = q.outbox("a")
        assert await q.put(readings(10))
        jobs = _writer_jobs(q)
        lease = await ob.lease(100, wait_s=1)
        await ob.ack(lease.items[-1].seq)  # through the tail
        assert ob.acked == 10 and ob.pending() == 0  # confirmed at once, in memory
        assert jobs == []  # no write of its own
        assert _cursor(db, "a") == 0
        assert await q.put(readings(5, 10))
        assert jobs == ["_commit_sync"]  # one transaction: the rows and the cursor
        assert _cursor(db, "a") == 10
        assert q._lazy == {}


async def test_confirmation_while_a_commit_is_in_flight_is_written_at_once(tmp_path: Path) -> None:
    """The commit in flight took its cursor snapshot already, and what it lands can be leased
    before the next commit: a confirmation left waiting then would be resent with that lease."""
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        ob = q.outbox("a")
        assert await q.put(readings(10))
        lease = await ob.lease(100, wait_s=1)
        gate = threading.Event()
        blocker = q._w.call(gate.wait, 10)  # the writer is busy: the next commit waits behind it
        put = asyncio.create_task(q.put(readings(5, 10)))
        while not q._committing:  # the commit took its snapshot and waits for the writer
            await asyncio.sleep(0)
        jobs = _writer_jobs(q)
        ack = asyncio.create_task(ob.ack(lease.items[-1].seq))  # through the (old) tail
        while not jobs:
            await asyncio.sleep(0)
        assert jobs == ["_write_cursors_sync"] and q._lazy == {}  # its own write, queued
        gate.set()
        assert await blocker is True
        assert await put
        await ack
        assert _cursor(db, "a") == 10
        lease2 = await ob.lease(100, wait_s=1)
        assert [it.seq for it in lease2.items] == list(range(11, 16))


async def test_confirmation_below_the_tail_is_written_at_once(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        ob = q.outbox("a")
        assert await q.put(readings(10))
        jobs = _writer_jobs(q)
        await ob.lease(4, wait_s=1)
        await ob.ack(4)  # a backlog, or a lease behind the tail: others may follow unwritten
        assert jobs == ["_write_cursors_sync"]
        assert _cursor(db, "a") == 4


async def test_at_most_one_confirmation_waits_per_uplink(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        ob = q.outbox("a")
        assert await q.put(readings(10))
        jobs = _writer_jobs(q)
        await ob.confirm(6, 10)  # live first: the newest readings, through the tail
        assert jobs == [] and "a" in q._lazy
        await ob.confirm(1, 3)  # the backlog's first batch: written now, the waiting one with it
        assert jobs == ["_write_cursors_sync"] and q._lazy == {}
        con = sqlite3.connect(db)
        assert con.execute("SELECT acked, ranges FROM cursors WHERE name='a'").fetchone() == \
            (3, "[[6,10]]")
        con.close()


async def test_waiting_confirmation_is_written_alone_after_the_linger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gatewayd.queue as queue_mod

    monkeypatch.setattr(queue_mod, "_CURSOR_LINGER_S", 0.05)
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        ob = q.outbox("a")
        assert await q.put(readings(10))
        jobs = _writer_jobs(q)
        await ob.ack(10)
        assert jobs == []
        async with asyncio.timeout(5):
            while not q._lazy_tasks and q._lazy:  # the timer starts the write
                await asyncio.sleep(0.01)
            await asyncio.gather(*q._lazy_tasks)
        assert jobs == ["_write_cursors_sync"]  # the cheap write (no fsync), not a commit
        assert _cursor(db, "a") == 10 and q._lazy == {}


async def test_waiting_confirmation_is_written_at_close_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["a"]) as q:
        ob = q.outbox("a")
        assert await q.put(readings(10))
        await ob.ack(10)
        assert _cursor(db, "a") == 0
    assert _cursor(db, "a") == 10
    async with opened(db, ["a"]) as q:
        assert q.outbox("a").pending() == 0
        lease = await q.outbox("a").lease(100, wait_s=0)
        assert lease.items == []  # nothing confirmed is sent again after a clean stop


async def test_crash_before_the_next_commit_resends_only_the_last_batch(tmp_path: Path) -> None:
    """A crash (the process gone: no close, no flush) loses only the waiting confirmation."""
    db = tmp_path / "q.db"
    q = Queue(db, CFG, ["a"])
    await q.open()
    task = asyncio.create_task(q.run())
    ob = q.outbox("a")
    assert await q.put(readings(10))
    await ob.ack(10)  # written at once? no: through the tail, so it waits
    assert await q.put(readings(10, 10))
    lease = await ob.lease(100, wait_s=1)
    assert [i.seq for i in lease.items] == list(range(11, 21))
    await ob.ack(20)  # waits for the next commit, which never comes
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if q._lazy_timer is not None:
        q._lazy_timer.cancel()
    # Abandon it as a SIGKILL would: the threads stop, nothing is flushed, the file stays.
    q._w.close()
    q._r.close()
    async with opened(db, ["a"]) as q2:
        lease = await q2.outbox("a").lease(100, wait_s=0)
        assert [i.seq for i in lease.items] == list(range(11, 21))  # that batch, nothing more


def _count_commits(q: Queue) -> list[int]:
    """Wrap the writer's commit: the returned list gets each commit's batch size."""
    sizes: list[int] = []
    real = q._commit_sync

    def counted(batch: list[Reading], *args: object) -> object:
        sizes.append(len(batch))
        return real(batch, *args)  # type: ignore[arg-type]

    q._commit_sync = counted  # type: ignore[method-assign]
    return sizes


async def test_a_commit_waits_for_the_polls_under_way_and_lands_them_together(tmp_path: Path) -> None:
    # A burst on a shared line: three devices due in the same tick, polled one after another.
    # The first one's readings must not commit alone while the others are still being read.
    async with opened(tmp_path / "q.db", ["a"], replace(CFG, commit_window=30.0)) as q:
        sizes = _count_commits(q)
        for _ in range(3):
            q.poll_started()
        first = q.submit(readings(4))
        q.poll_ended()
        done, _ = await asyncio.wait([first], timeout=0.3)
        assert not done and sizes == [], "committed alone while two polls were under way"
        second = q.submit(readings(4, start=4))
        q.poll_ended()
        done, _ = await asyncio.wait([first], timeout=0.3)
        assert not done and sizes == [], "committed while a poll was still under way"
        third = q.submit(readings(4, start=8))
        q.poll_ended()
        assert await first and await second and await third
        assert sizes == [12] and q.polls_in_flight == 0


async def test_with_the_writer_idle_and_no_poll_under_way_a_reading_commits_at_once(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["a"], replace(CFG, commit_window=30.0)) as q:
        sizes = _count_commits(q)
        q.poll_started()
        q.poll_ended()  # a poll that ended (failed) without readings leaves nothing to wait for
        assert await asyncio.wait_for(q.submit(readings(2)), 10)  # well within the window
        assert sizes == [2]


async def test_a_poll_that_never_ends_delays_a_commit_by_the_window_at_most(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["a"], replace(CFG, commit_window=0.2)) as q:
        sizes = _count_commits(q)
        q.poll_started()  # a device hung mid-read (its own timeout is longer than the window)
        t0 = time.monotonic()
        assert await asyncio.wait_for(q.submit(readings(3)), 10)
        waited = time.monotonic() - t0
        assert waited >= 0.19, f"committed after {waited:.3f}s: did not wait for the poll"
        assert sizes == [3]
        q.poll_ended()
        assert q.polls_in_flight == 0


async def test_a_full_batch_is_not_held_for_polls_under_way_past_the_window(tmp_path: Path) -> None:
    # commit_max_rows: a batch that reached the cap commits once the window allows, whatever
    # is under way; readings past the cap follow in the next commit.
    async with opened(tmp_path / "q.db", ["a"], replace(CFG, commit_window=0.2, commit_max_rows=5)) as q:
        sizes = _count_commits(q)
        q.poll_started()
        futs = [q.submit(readings(5)), q.submit(readings(5, start=5))]
        assert all(await asyncio.wait_for(asyncio.gather(*futs), 10))
        assert sum(sizes) == 10 and max(sizes) <= 5
        q.poll_ended()
