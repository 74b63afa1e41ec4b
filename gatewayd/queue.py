"""The durable queue: SQLite in WAL mode, group commit, one delivery cursor per uplink.

Layout:
- `readings(seq, ts, sid, val, vt, q, off)`: `seq` is contiguous (assigned at commit, so a
  failed commit leaves no gap); `sid` points into `series(sid, dev, pt)`; `vt` says how `val` is
  encoded (native, bool, JSON, null); `off` has bit `cursor.bit` set when that uplink was
  disconnected at enqueue time.
- `cursors(name, bit, acked)`: everything up to `acked` was confirmed by that uplink's cloud.
- `meta(k, v)`: `last_seq`, so seq keeps growing after every row was collected.

What a crash can lose: readings submitted but not yet committed, i.e. at most the open commit
window (default 100 ms). `put()` returns only after the commit. With `fsync = "always"` a
commit also survives power loss; with "normal" (WAL, synchronous=NORMAL) it survives a process
crash, and a power loss may roll back the last commits but never corrupts the file.

All SQLite work runs in two threads: one writer (commits, acks, GC) and one reader (leases), so
the event loop never blocks on disk, and a 1M-row backlog is never loaded into memory.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import structlog

from drivers.base import ByteSize, Duration, Range, Reading
from gatewayd.errors import UplinkUnavailableError
from gatewayd.uplinks.base import Item, Lease

log = structlog.get_logger("gatewayd.queue")
T = TypeVar("T")

_SQLITE_MAGIC = b"SQLite format 3\x00"
_VT_NATIVE, _VT_BOOL, _VT_JSON, _VT_NULL = 0, 1, 2, 3
_ROW_OVERHEAD = 24  # approx. bytes per row beyond the value: seq, ts, sid, flags, b-tree cell
_GC_CHUNK = 50_000  # rows deleted per transaction, so GC never holds the writer for long
_MAX_UPLINKS = 62  # bits in the `off` column


@dataclass(frozen=True, slots=True)
class QueueConfig:
    commit_window: Duration = 0.1  # group commit: one transaction per window
    commit_max_rows: Annotated[int, Range(1, 1_000_000)] = 20_000  # commit early past this
    fsync: Literal["always", "normal", "off"] = "normal"
    max_rows: Annotated[int, Range(1000, None)] = 10_000_000
    max_bytes: ByteSize = 1024**3
    max_age: Duration = 30 * 86400.0
    max_file_size: ByteSize = 0  # hard cap on the SQLite file (0: none); writes past it fail
    gc_interval: Duration = 5.0
    new_uplink_start: Literal["now", "oldest"] = "now"
    memory_buffer: Annotated[int, Range(0, None)] = 100_000  # held while the disk refuses writes
    integrity_check: Literal["quick", "off"] = "quick"


class _RateLimitedLog:
    """Logs an event at most once per `every_s`, with the count of suppressed repeats."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, key: str = "", **kw: Any) -> None:
        k = event + key
        now = time.monotonic()
        if now - self._last.get(k, -math.inf) < self.every_s:
            self._suppressed[k] = self._suppressed.get(k, 0) + 1
            return
        self._last[k] = now
        log.warning(event, suppressed=self._suppressed.pop(k, 0), **kw)


def _encode(value: Any) -> tuple[Any, int]:
    if value is None:
        return None, _VT_NULL
    if value is True or value is False:
        return int(value), _VT_BOOL
    if isinstance(value, int | float | str):
        return value, _VT_NATIVE
    return json.dumps(value, separators=(",", ":")), _VT_JSON


def _decode(val: Any, vt: int) -> Any:
    if vt == _VT_NATIVE:
        return val
    if vt == _VT_BOOL:
        return bool(val)
    if vt == _VT_JSON:
        return json.loads(val)
    return None


class Queue:
    """The durable queue. `await open()`, run `run()` in the service's TaskGroup, `close()`."""

    def __init__(self, path: Path, config: QueueConfig, uplinks: Sequence[str] = (),
                 metrics: Any = None, starts: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self._uplink_names = list(uplinks)
        self._starts = starts or {}
        self.metrics = metrics
        self._w = ThreadPoolExecutor(1, thread_name_prefix="queue-writer")
        self._r = ThreadPoolExecutor(1, thread_name_prefix="queue-reader")
        self._db: sqlite3.Connection | None = None  # writer thread only
        self._rdb: sqlite3.Connection | None = None  # reader thread only
        self._series: dict[tuple[str, str], int] = {}
        self._series_by_id: dict[int, tuple[str, str]] = {}
        self._pending: list[Reading] = []
        self._pending_futs: list[asyncio.Future[bool]] = []
        self._retry: list[Reading] = []  # readings the disk refused, retried each window
        self._have_pending = asyncio.Event()
        self._full = asyncio.Event()
        self._committed = asyncio.Condition()
        self._commit_lock = asyncio.Lock()  # one commit at a time: seq is assigned from `tail`
        self._outboxes: dict[str, Outbox] = {}
        self.head = 1  # first seq present (head > tail: empty)
        self.tail = 0  # last committed seq
        self.bytes_est = 0  # approximate bytes of rows present
        self.dropped_total = 0
        self.store_failed = 0
        self.store_error = ""  # current disk condition, "" when healthy
        self.renamed_corrupt: Path | None = None
        self._rl = _RateLimitedLog()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._w, fn, *args)

    async def _on_reader(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._r, fn, *args)

    async def open(self) -> None:
        """Open (or create, or replace a corrupt) database and load cursors."""
        cursors = await self._on_writer(self._open_sync)
        await self._on_reader(self._open_reader_sync)
        for name, (bit, acked) in cursors.items():
            self._outboxes[name] = Outbox(self, name, bit, acked)
        log.info("queue_opened", path=str(self.path), rows=self.rows, head=self.head,
                 tail=self.tail, uplinks=list(self._outboxes))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        sync = {"always": "FULL", "normal": "NORMAL", "off": "OFF"}[self.config.fsync]
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("PRAGMA cache_size=-4096")  # 4 MiB page cache: memory stays flat
        db.execute("PRAGMA temp_store=MEMORY")
        if self.config.max_file_size:
            page = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={max(16, self.config.max_file_size // page)}")
        return db

    def _is_corrupt(self) -> str:
        """Why the existing file is unusable, or "" if it is fine (or absent)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return ""
        with self.path.open("rb") as f:
            if f.read(16) != _SQLITE_MAGIC:
                return "not an SQLite database"
        if self.config.integrity_check == "off":
            return ""
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                rows = db.execute("PRAGMA quick_check").fetchall()
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            return f"cannot be read: {exc}"
        if rows != [("ok",)]:
            return "integrity check failed: " + "; ".join(str(r[0]) for r in rows[:3])
        return ""

    def _rename_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, target.with_name(target.name + suffix))
        self.renamed_corrupt = target
        log.error("queue_corrupt_renamed", path=str(self.path), moved_to=str(target), reason=why)

    def _open_sync(self) -> dict[str, tuple[int, int]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        why = self._is_corrupt()
        if why:
            self._rename_aside(why)
        try:
            db = self._connect()
            self._create_schema(db)
        except sqlite3.DatabaseError as exc:
            # Opened but unusable (e.g. a half-written schema): start afresh rather than refuse.
            self._rename_aside(f"cannot be used: {exc}")
            db = self._connect()
            self._create_schema(db)
        self._db = db
        for sid, dev, pt in db.execute("SELECT sid, dev, pt FROM series"):
            self._series[(dev, pt)] = sid
            self._series_by_id[sid] = (dev, pt)
        row = db.execute("SELECT min(seq), max(seq) FROM readings").fetchone()
        meta = db.execute("SELECT v FROM meta WHERE k='last_seq'").fetchone()
        last = max(int(meta[0]) if meta else 0, row[1] or 0)
        self.tail = last
        self.head = row[0] if row[0] is not None else last + 1
        self.bytes_est = self._bytes_between(db, self.head, self.tail)
        return self._reconcile_cursors(db)

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS series(sid INTEGER PRIMARY KEY, dev TEXT NOT NULL,
                                              pt TEXT NOT NULL, UNIQUE(dev, pt));
            CREATE TABLE IF NOT EXISTS readings(seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL,
                sid INTEGER NOT NULL, val, vt INTEGER NOT NULL, q INTEGER NOT NULL,
                off INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS cursors(name TEXT PRIMARY KEY, bit INTEGER NOT NULL,
                                               acked INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v);
            """
        )

    def _bytes_between(self, db: sqlite3.Connection, lo: int, hi: int) -> int:
        if hi < lo:
            return 0
        n, text = db.execute(
            "SELECT count(*), coalesce(sum(CASE WHEN typeof(val)='text' THEN length(val) ELSE 8 END),0)"
            " FROM readings WHERE seq BETWEEN ? AND ?", (lo, hi)).fetchone()
        return int(n) * _ROW_OVERHEAD + int(text)

    def _reconcile_cursors(self, db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
        existing = {n: (b, a) for n, b, a in db.execute("SELECT name, bit, acked FROM cursors")}
        wanted = self._uplink_names
        db.execute("BEGIN")
        for name in set(existing) - set(wanted):
            db.execute("DELETE FROM cursors WHERE name=?", (name,))
            log.info("uplink_cursor_dropped", uplink=name, acked=existing[name][1])
        used = {b for n, (b, _) in existing.items() if n in wanted}
        out: dict[str, tuple[int, int]] = {}
        for name in wanted:
            if name in existing:
                bit, acked = existing[name]
            else:
                free = [b for b in range(_MAX_UPLINKS) if b not in used]
                if not free:
                    raise ValueError(f"too many uplinks (at most {_MAX_UPLINKS})")
                bit = free[0]
                used.add(bit)
                start = self._starts.get(name, self.config.new_uplink_start)
                acked = self.tail if start == "now" else self.head - 1
                db.execute("INSERT INTO cursors(name, bit, acked) VALUES (?,?,?)", (name, bit, acked))
                log.info("uplink_cursor_created", uplink=name, start=start, acked=acked)
            out[name] = (bit, acked)
        db.execute("COMMIT")
        return out

    def _open_reader_sync(self) -> None:
        self._rdb = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._rdb.execute("PRAGMA cache_size=-4096")

    async def close(self) -> None:
        """Commit what is pending, then close the database. Idempotent."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        for ob in self._outboxes.values():
            ob.closed = True
        async with self._committed:
            self._committed.notify_all()
        await self._on_reader(self._close_reader_sync)
        await self._on_writer(self._close_writer_sync)
        self._w.shutdown(wait=True)
        self._r.shutdown(wait=True)
        log.info("queue_closed", tail=self.tail, rows=self.rows)

    def _close_reader_sync(self) -> None:
        if self._rdb is not None:
            self._rdb.close()
            self._rdb = None

    def _close_writer_sync(self) -> None:
        if self._db is not None:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._db = None

    # -- appending ------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return max(0, self.tail - self.head + 1)

    def outbox(self, name: str) -> Outbox:
        return self._outboxes[name]

    async def add_uplink(self, name: str, start: str | None = None) -> Outbox:
        """A cursor for an uplink added at run time (config reload); an existing one is kept."""
        if name in self._outboxes:
            return self._outboxes[name]
        if start:
            self._starts[name] = start
        self._uplink_names.append(name)
        assert self._db is not None
        cursors = await self._on_writer(self._reconcile_cursors, self._db)
        bit, acked = cursors[name]
        self._outboxes[name] = Outbox(self, name, bit, acked)
        return self._outboxes[name]

    async def drop_uplink(self, name: str) -> None:
        """Forget a removed uplink's cursor (after the reload grace period): GC may pass it."""
        ob = self._outboxes.pop(name, None)
        if ob is None:
            return
        ob.closed = True
        self._uplink_names = [n for n in self._uplink_names if n != name]
        db = self._db
        assert db is not None
        await self._on_writer(db.execute, "DELETE FROM cursors WHERE name=?", (name,))
        log.info("uplink_cursor_dropped", uplink=name, acked=ob.acked)

    @property
    def outboxes(self) -> dict[str, Outbox]:
        return self._outboxes

    def submit(self, readings: Iterable[Reading]) -> asyncio.Future[bool]:
        """Add readings to the open commit window; the future is True once they are durable."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_result(False)
            return fut
        self._pending.extend(readings)
        self._pending_futs.append(fut)
        self._have_pending.set()
        if len(self._pending) >= self.config.commit_max_rows:
            self._full.set()
        return fut

    def backpressure(self) -> bool:
        """True when producers outrun the disk: the open window is over its size cap."""
        return len(self._pending) + len(self._retry) > self.config.commit_max_rows

    async def put(self, readings: Iterable[Reading]) -> bool:
        """Append readings; returns after the commit (True), or False if the disk refused them."""
        return await self.submit(readings)

    async def flush(self) -> None:
        """Commit the open window now."""
        if self._pending or self._retry:
            await self._commit()

    async def run(self) -> None:
        """The group-commit and GC loops. Runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._commit_loop(), name="queue-commit")
            tg.create_task(self._gc_loop(), name="queue-gc")

    async def _commit_loop(self) -> None:
        while True:
            await self._have_pending.wait()
            try:
                async with asyncio.timeout(self.config.commit_window):
                    await self._full.wait()
            except TimeoutError:
                pass
            await self._commit()

    async def _commit(self) -> None:
        async with self._commit_lock:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        batch, futs = self._retry + self._pending, self._pending_futs
        self._retry, self._pending, self._pending_futs = [], [], []
        self._have_pending.clear()
        self._full.clear()
        if not batch:
            for f in futs:
                if not f.done():
                    f.set_result(True)
            return
        offline = 0
        for ob in self._outboxes.values():
            if not ob.connected:
                offline |= 1 << ob.bit
        started = time.perf_counter()
        try:
            first, last, nbytes = await self._on_writer(self._commit_sync, batch, offline)
        except sqlite3.Error as exc:
            self._store_failed(batch, exc)
            for f in futs:
                if not f.done():
                    f.set_result(False)
            return
        if self.metrics is not None:
            self.metrics.commit_latency.observe(time.perf_counter() - started)
            self.metrics.readings_queued.inc(len(batch))
        if self.store_error:
            log.warning("queue_store_recovered", condition=self.store_error)
            self.store_error = ""
        self.tail = last
        self.bytes_est += nbytes
        log.debug("queue_committed", first_seq=first, last_seq=last, count=len(batch))
        if self.rows > self.config.max_rows or self.bytes_est > self.config.max_bytes:
            try:
                await self.enforce_caps()  # before put() returns: the caps hold afterwards
            except sqlite3.Error as exc:
                self._rl.warning("queue_cap_failed", error=str(exc))
        for f in futs:
            if not f.done():
                f.set_result(True)
        async with self._committed:
            self._committed.notify_all()

    def _commit_sync(self, batch: list[Reading], offline: int) -> tuple[int, int, int]:
        db = self._db
        assert db is not None
        series = self._series
        seq = self.tail
        first = seq + 1
        rows: list[tuple[Any, ...]] = []
        nbytes = 0
        new_series: list[tuple[int, str, str]] = []
        append = rows.append
        for r in batch:
            key = (r.device, r.point)
            sid = series.get(key)
            if sid is None:
                sid = len(series) + 1
                series[key] = sid
                self._series_by_id[sid] = key
                new_series.append((sid, r.device, r.point))
            v = r.value
            if v.__class__ is float or v.__class__ is int:
                vt = _VT_NATIVE
            else:
                v, vt = _encode(v)
                if isinstance(v, str):
                    nbytes += len(v) - 8
            seq += 1
            append((seq, r.ts_ms, sid, v, vt, r.quality, offline))
        nbytes += len(batch) * (_ROW_OVERHEAD + 8)
        try:
            db.execute("BEGIN")
            if new_series:
                db.executemany("INSERT INTO series(sid, dev, pt) VALUES (?,?,?)", new_series)
            db.executemany("INSERT INTO readings(seq, ts, sid, val, vt, q, off) VALUES (?,?,?,?,?,?,?)",
                           rows)
            db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('last_seq', ?)", (seq,))
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for sid, dev, pt in new_series:
                del series[(dev, pt)]
                del self._series_by_id[sid]
            raise
        return first, seq, nbytes

    def _store_failed(self, batch: list[Reading], exc: sqlite3.Error) -> None:
        text = str(exc)
        if "readonly" in text or "read-only" in text:
            reason = "read_only"
        elif "full" in text:
            reason = "disk_full"
        else:
            reason = "io_error"
        self.store_error = reason
        keep = self.config.memory_buffer
        lost = max(0, len(batch) - keep)
        self._retry = batch[lost:] if keep else []
        if not keep:
            lost = len(batch)
        if lost:
            self.store_failed += lost
            if self.metrics is not None:
                self.metrics.store_failures.labels(reason).inc(lost)
        self._rl.warning("queue_store_failed", key=reason, condition=reason, error=text,
                         lost=lost, held_in_memory=len(self._retry))
        if self._retry:
            self._have_pending.set()

    # -- caps and GC ----------------------------------------------------------------------------

    async def enforce_caps(self) -> int:
        """Drop the oldest rows past max_rows / max_bytes / max_age. Returns rows dropped."""
        cut, reason = await self._on_writer(self._find_cut_sync)
        if cut < self.head:
            return 0
        return await self._drop_through(cut, reason)

    def _find_cut_sync(self) -> tuple[int, str]:
        db = self._db
        assert db is not None
        cut, reason = self.head - 1, ""
        if self.rows > self.config.max_rows:
            cut, reason = self.tail - self.config.max_rows, "max_rows"
        if self.bytes_est > self.config.max_bytes and self.rows:
            avg = self.bytes_est / self.rows
            excess_rows = math.ceil((self.bytes_est - self.config.max_bytes) / avg)
            c = self.head - 1 + excess_rows
            if c > cut:
                cut, reason = c, "max_bytes"
        cutoff_ms = int((time.time() - self.config.max_age) * 1000)
        if cut < self.tail:  # seq is contiguous: rows remain after the cut
            young = db.execute("SELECT seq FROM readings WHERE seq > ? AND ts >= ? ORDER BY seq LIMIT 1",
                               (cut, cutoff_ms)).fetchone()
            c = (young[0] - 1) if young is not None else self.tail
            if c > cut:
                cut, reason = c, "max_age"
        return min(cut, self.tail), reason

    async def _drop_through(self, cut: int, reason: str) -> int:
        """Delete rows up to `cut`, moving lagging cursors past them and counting drops."""
        per_uplink: dict[str, int] = {}
        for name, ob in self._outboxes.items():
            if ob.acked < cut:
                per_uplink[name] = cut - max(ob.acked, self.head - 1)
        first = self.head
        removed_bytes = await self._on_writer(self._delete_through_sync, cut, per_uplink)
        n = cut - first + 1
        self.head = cut + 1
        self.bytes_est = max(0, self.bytes_est - removed_bytes)
        for name, count in per_uplink.items():
            ob = self._outboxes[name]
            ob.acked = max(ob.acked, cut)
            ob.next_seq = max(ob.next_seq, cut)
            ob.dropped[reason] = ob.dropped.get(reason, 0) + count
            self.dropped_total += count
            if self.metrics is not None:
                self.metrics.readings_dropped.labels(name, reason).inc(count)
            self._rl.warning("queue_dropped_oldest", key=name + reason, uplink=name,
                             reason=reason, count=count, through_seq=cut)
        return n

    def _delete_through_sync(self, cut: int, per_uplink: dict[str, int]) -> int:
        db = self._db
        assert db is not None
        removed = self._bytes_between(db, self.head, cut)
        lo = self.head
        db.execute("BEGIN")
        try:
            for name in per_uplink:
                db.execute("UPDATE cursors SET acked=max(acked, ?) WHERE name=?", (cut, name))
            while lo <= cut:
                hi = min(cut, lo + _GC_CHUNK - 1)
                db.execute("DELETE FROM readings WHERE seq BETWEEN ? AND ?", (lo, hi))
                lo = hi + 1
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return removed

    async def collect(self) -> int:
        """Delete rows every uplink has acked (a chunk at a time). Returns rows deleted."""
        done = min((ob.acked for ob in self._outboxes.values()), default=self.tail)
        if done < self.head:
            return 0
        cut = min(done, self.head + _GC_CHUNK - 1)
        removed = await self._on_writer(self._delete_through_sync, cut, {})
        n = cut - self.head + 1
        self.head = cut + 1
        self.bytes_est = max(0, self.bytes_est - removed)
        return n

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc_interval)
            try:
                await self.enforce_caps()
                while await self.collect() >= _GC_CHUNK:
                    await asyncio.sleep(0)
            except sqlite3.Error as exc:
                self._rl.warning("queue_gc_failed", error=str(exc))
            self.update_gauges()

    # -- reading --------------------------------------------------------------------------------

    async def wait_committed(self, after_seq: int, timeout_s: float | None) -> bool:
        """Wait until a row after `after_seq` is committed. False on timeout or close."""
        if self.tail > after_seq:
            return True
        async with self._committed:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._committed.wait_for(lambda: self.tail > after_seq or self._closed)
            except TimeoutError:
                return False
        return self.tail > after_seq

    def _lease_sync(self, after: int, upto: int, max_items: int, max_bytes: int, bit: int,
                    live_from: int) -> list[Item]:
        db = self._rdb
        assert db is not None
        by_id = self._series_by_id
        out: list[Item] = []
        total = 0
        mask = 1 << bit
        cur = db.execute(
            "SELECT seq, ts, sid, val, vt, q, off FROM readings WHERE seq > ? AND seq <= ?"
            " ORDER BY seq LIMIT ?", (after, upto, max_items))
        for seq, ts, sid, val, vt, q, off in cur:
            if vt:
                val = _decode(val, vt)
            dev, pt = by_id[sid]
            if max_bytes:
                total += _ROW_OVERHEAD + (len(val) if isinstance(val, str) else 8)
                if total > max_bytes and out:
                    break
            out.append(Item(seq, Reading(dev, pt, val, ts, q), bool(off & mask) or seq < live_from))
        return out

    def oldest_ts_ms(self, after_seq: int) -> int | None:
        """Sampling time of the first row after `after_seq` (reader thread)."""
        db = self._rdb
        if db is None:
            return None
        row = db.execute("SELECT ts FROM readings WHERE seq > ? ORDER BY seq LIMIT 1",
                         (after_seq,)).fetchone()
        return row[0] if row else None

    async def backlog_stats(self) -> dict[str, dict[str, Any]]:
        """Per uplink: rows, approximate bytes and oldest age (s) past its cursor."""
        out: dict[str, dict[str, Any]] = {}
        now_ms = time.time() * 1000
        avg = self.bytes_est / self.rows if self.rows else 0
        for name, ob in self._outboxes.items():
            pending = ob.pending()
            oldest = await self._on_reader(self.oldest_ts_ms, ob.acked) if pending else None
            out[name] = {
                "rows": pending,
                "bytes": int(pending * avg),
                "oldest_age_s": round((now_ms - oldest) / 1000, 3) if oldest else 0.0,
                "acked_seq": ob.acked,
                "connected": ob.connected,
                "dropped": dict(ob.dropped),
                "quarantined": dict(ob.quarantined),
            }
        return out

    def update_gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.queue_rows.set(self.rows)
        avg = self.bytes_est / self.rows if self.rows else 0
        for name, ob in self._outboxes.items():
            self.metrics.backlog_rows.labels(name).set(ob.pending())
            self.metrics.backlog_bytes.labels(name).set(int(ob.pending() * avg))


class Outbox:
    """One uplink's cursor over the queue. See `gatewayd.uplinks.base.Outbox` for the contract."""

    def __init__(self, queue: Queue, name: str, bit: int, acked: int) -> None:
        self.queue = queue
        self.name = name
        self.bit = bit
        self.acked = acked  # durable cursor
        self.next_seq = acked  # last seq handed out by lease()
        self.connected = False
        self.live_from = queue.tail + 1  # seqs below this are backlog for the current connection
        self.dropped: dict[str, int] = {}
        self.quarantined: dict[str, int] = {}
        self.closed = False
        self._ack_lock = asyncio.Lock()

    async def lease(self, max_items: int, max_bytes: int = 0, wait_s: float | None = None,
                    linger_s: float = 0.0) -> Lease:
        q = self.queue
        if self.next_seq < self.acked:
            self.next_seq = self.acked
        if self.closed:
            raise UplinkUnavailableError("the queue is closed")
        if not await q.wait_committed(self.next_seq, wait_s) or self.closed:
            return Lease(self.name, [])
        if linger_s > 0 and q.tail - self.next_seq < max_items:
            # A trickle: wait a little for a fuller batch (fewer wake-ups, messages and acks).
            await q.wait_committed(self.next_seq + max_items - 1, linger_s)
        items = await q._on_reader(q._lease_sync, self.next_seq, q.tail, max_items, max_bytes,
                                   self.bit, self.live_from)
        if items:
            self.next_seq = items[-1].seq
        return Lease(self.name, items)

    async def ack(self, seq: int) -> None:
        async with self._ack_lock:
            if seq <= self.acked:
                return
            q = self.queue
            await q._on_writer(self._ack_sync, seq)
            if q.metrics is not None:
                q.metrics.readings_acked.labels(self.name).inc(seq - self.acked)
            self.acked = seq

    def _ack_sync(self, seq: int) -> None:
        db = self.queue._db
        assert db is not None
        db.execute("UPDATE cursors SET acked=max(acked, ?) WHERE name=?", (seq, self.name))

    def rewind(self) -> None:
        self.next_seq = self.acked

    def quarantine(self, item: Item, reason: str, detail: str = "") -> None:
        self.quarantined[reason] = self.quarantined.get(reason, 0) + 1
        q = self.queue
        if q.metrics is not None:
            q.metrics.readings_dropped.labels(self.name, f"rejected:{reason}").inc()
        q._rl.warning("reading_quarantined", key=self.name + reason, uplink=self.name,
                      reason=reason, detail=detail, seq=item.seq, device=item.reading.device,
                      point=item.reading.point)

    def set_connected(self, connected: bool) -> None:
        if connected and not self.connected:
            self.live_from = self.queue.tail + 1
        self.connected = connected

    def pending(self) -> int:
        return max(0, self.queue.tail - self.acked)

