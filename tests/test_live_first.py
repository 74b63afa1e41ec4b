"""Live first, queue side: confirmations as ranges, lanes over the unconfirmed rows, restarts.

Real SQLite files; the lanes are driven by hand here (the engine drives them in
tests/test_engine_lanes.py and tests/enos/test_live_first.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from drivers.base import Reading
from gatewayd.queue import MAX_RANGES, Lane, Outbox, Queue
from tests.test_queue import CFG, opened, readings


async def drain(lane: Lane, batch: int = 1000) -> list[int]:
    """Lease and confirm everything a bounded lane holds; returns the seqs in lease order."""
    seqs: list[int] = []
    while True:
        lease = await lane.lease(batch, wait_s=0)
        if not lease.items:
            assert lane.finished
            return seqs
        seqs += [i.seq for i in lease.items]
        await lane.ack(lease.last_seq)


async def live_session(q: Queue, ob: Outbox, n: int, confirm: int) -> tuple[int, int]:
    """Connect, commit `n` live readings, confirm the first `confirm` of them through the live
    lane, disconnect. Returns the live lane's seq range."""
    ob.set_connected(True)
    live, _backlog = ob.lanes(True)
    assert await q.put(readings(n))
    first = live.lo
    if confirm:
        lease = await live.lease(confirm, wait_s=1)
        assert lease.items[0].seq == first and len(lease.items) == confirm
        await live.ack(lease.last_seq)
    ob.set_connected(False)
    ob.rewind()
    return first, first + n - 1


async def test_three_outages_leave_three_ranges_that_drain_oldest_first(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["up"]) as q:
        ob = q.outbox("up")
        # Outage 1: 100 readings while offline.
        assert await q.put(readings(100))
        # A session that delivers only its live part, then outage 2, and so on three times.
        for _ in range(2):
            await live_session(q, ob, 50, confirm=50)
            assert await q.put(readings(100))  # the next outage
        assert ob.ranges() == [(1, 100), (151, 250), (301, 400)]
        assert ob.acked == 0 and ob.done == [(101, 150), (251, 300)]
        assert ob.pending() == 300
        # Reconnect: the backlog lane takes the three ranges oldest first, skipping what the
        # earlier live lanes confirmed; the live lane starts at the tail.
        ob.set_connected(True)
        live, backlog = ob.lanes(True)
        assert live.lo == 401 and backlog.backlog and not live.backlog
        assert ob.backlog_rows() == 300
        lease = await backlog.lease(1000, wait_s=0)
        assert [i.seq for i in lease.items] == list(range(1, 101))  # one range per lease
        assert all(i.backlog for i in lease.items)
        await backlog.ack(lease.last_seq)
        assert ob.acked == 150 and ob.ranges() == [(151, 250), (301, 400)]
        rest = await drain(backlog)
        assert rest == [*range(151, 251), *range(301, 401)]
        assert ob.acked == 400 and ob.done == [] and ob.pending() == 0


async def test_live_lane_never_waits_for_the_backlog(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["up"]) as q:
        ob = q.outbox("up")
        assert await q.put(readings(5000))  # a backlog
        ob.set_connected(True)
        live, backlog = ob.lanes(True)
        assert await q.put(readings(3, start=9000))
        lease = await live.lease(100, wait_s=1)
        assert [i.seq for i in lease.items] == [5001, 5002, 5003]
        assert [i.backlog for i in lease.items] == [False] * 3
        await live.ack(5003)
        assert ob.acked == 0 and ob.done == [(5001, 5003)]
        assert ob.backlog_rows() == 5000 and ob.pending() == 5000
        await drain(backlog)
        assert ob.acked == 5003 and ob.done == []


async def test_ranges_survive_a_restart_nothing_confirmed_is_leased_again(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["up", "other"]) as q:
        ob = q.outbox("up")
        assert await q.put(readings(100))
        await live_session(q, ob, 100, confirm=60)  # live 101..200, 101..160 confirmed
        ob.set_connected(True)
        _live, backlog = ob.lanes(True)
        lease = await backlog.lease(30, wait_s=0)
        await backlog.ack(lease.last_seq)  # backlog 1..30 confirmed
        assert ob.acked == 30 and ob.done == [(101, 160)]
    async with opened(db, ["up", "other"]) as q:
        ob = q.outbox("up")
        assert ob.acked == 30 and ob.done == [(101, 160)]
        assert ob.pending() == 200 - 30 - 60
        seqs = []
        while lease := (await ob.lease(1000, wait_s=0)).items:  # the single lane skips them too
            seqs += [i.seq for i in lease]
        assert seqs == [*range(31, 101), *range(161, 201)]
        await ob.ack(200)
        assert ob.acked == 200 and ob.done == []
        # GC keeps rows every uplink still needs: "other" confirmed nothing.
        assert await q.collect() == 0
        assert q.rows == 200


async def test_gc_passes_only_the_lowest_unconfirmed_seq(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["up"]) as q:
        ob = q.outbox("up")
        assert await q.put(readings(100))
        await live_session(q, ob, 100, confirm=100)  # 101..200 confirmed, 1..100 not
        assert await q.collect() == 0  # nothing below the low-water mark
        ob.set_connected(True)
        _live, backlog = ob.lanes(True)
        lease = await backlog.lease(40, wait_s=0)
        await backlog.ack(lease.last_seq)
        assert await q.collect() == 40
        assert q.head == 41


async def test_the_range_list_is_bounded_and_forgetting_only_resends(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["up"]) as q:
        ob = q.outbox("up")
        n = MAX_RANGES + 5
        assert await q.put(readings(2 * n))
        for k in range(n):  # confirm every second seq: n separate ranges
            await ob.confirm(2 * k + 2, 2 * k + 2)
        assert len(ob.done) == MAX_RANGES
        assert ob.forgotten == 5
        # Nothing unconfirmed is ever marked confirmed: every odd seq is still to deliver.
        assert ob.pending() == 2 * n - MAX_RANGES
        seqs = []
        while lease := (await ob.lease(10_000, wait_s=0)).items:
            seqs += [i.seq for i in lease]
        assert set(range(1, 2 * n + 1, 2)) <= set(seqs)


async def test_an_unreadable_ranges_column_resends_instead_of_failing(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["up"]) as q:
        assert await q.put(readings(50))
        await q.outbox("up").confirm(21, 30)
    con = sqlite3.connect(db)
    con.execute("UPDATE cursors SET ranges='not json' WHERE name='up'")
    con.commit()
    con.close()
    async with opened(db, ["up"]) as q:
        ob = q.outbox("up")
        assert ob.done == [] and ob.pending() == 50  # 21..30 go again: duplicates, no loss


async def test_a_version_2_database_migrates_with_its_cursor(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db, ["up"]) as q:
        assert await q.put(readings(10))
        await q.outbox("up").ack(4)
    con = sqlite3.connect(db)  # make it look like schema 2: no ranges column
    con.execute("ALTER TABLE cursors DROP COLUMN ranges")
    con.execute("PRAGMA user_version=2")
    con.commit()
    con.close()
    async with opened(db, ["up"]) as q:
        ob = q.outbox("up")
        assert ob.acked == 4 and ob.done == [] and ob.pending() == 6
        await ob.confirm(8, 9)
        assert ob.done == [(8, 9)]


async def test_live_leases_come_from_memory_with_the_values_the_database_holds(tmp_path: Path) -> None:
    async with opened(tmp_path / "q.db", ["up"], CFG) as q:
        ob = q.outbox("up")
        ob.set_connected(True)
        live, _ = ob.lanes(True)
        batch = [Reading("d", "s", "text", 1), Reading("d", "b", True, 2),
                 Reading("d", "j", {"x": [1, 2]}, 3), Reading("d", "n", None, 4, 2)]
        assert await q.put(batch)
        hot = [(i.seq, i.reading, i.backlog) for i in (await live.lease(10, wait_s=1)).items]
        cold = q._lease_sync(0, q.tail, 10, 0, ob.bit, ob.live_from, False)
        assert hot == [(i.seq, i.reading, i.backlog) for i in cold]
