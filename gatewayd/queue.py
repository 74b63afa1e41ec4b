"""The durable queue: SQLite in WAL mode, adaptive group commit, confirmed ranges per uplink.

Layout:
- `readings(seq, ts, sid, val, vt, q, off)`: `seq` grows by one per reading (assigned at commit,
  so a failed commit leaves no gap; only a detected state loss skips numbers, see below); `sid`
  points into `series(sid, dev, pt)`; `vt` says how `val` is encoded (native, bool, JSON, null);
  `off` has bit `cursor.bit` set when that uplink was disconnected at enqueue time.
- `cursors(name, bit, acked, ranges)`: everything up to `acked` was confirmed by that uplink's
  cloud, and so were the seq ranges in `ranges` (JSON) above it: with live-first delivery the
  live lane confirms new readings while older ones still drain (see `Outbox`).
- `meta(k, v)`: `last_seq`, so seq keeps growing after every row was collected; `queue_id`;
  `gaps`, the seq ranges skipped after a state loss.

Next to the database, `queue.state` (the sidecar, a small JSON file written atomically and
fsynced) holds the queue's identity, the last committed seq it knew of (written every GC pass
and at shutdown), the highest seq it may have handed out (`reserved`, written before a commit
passes it) and whether the last stop was clean. At start, a database whose tail is below the
sidecar's mark, or an empty or missing database next to a sidecar, is a state loss: an error
event names how many readings were lost, `gatewayd_queue_state_lost_readings_total` counts
them, and numbering continues above `reserved`, so no seq is ever used for two readings.

What a crash can lose: readings submitted but not yet committed, i.e. at most the open commit
window. `put()` returns only after the commit. With `fsync = "always"` (the default) a commit
also survives a power cut; with "normal" (WAL, synchronous=NORMAL) it survives a process crash,
and a power cut may roll back the last commits (never corrupting the file).

Storage faults (disk full, read-only, I/O error, locked) on any write path (append, ack, cursor
writes, GC, open) never raise out of the queue: `Queue.storage` turns degraded, readings wait in
a bounded memory buffer (the excess is dropped and counted), acks are kept in memory, and a probe
retries every `_PROBE_S` until the disk takes writes again. One log line per condition change.

All SQLite work runs in two threads: one writer (commits, acks, GC) and one reader (leases), so
the event loop never blocks on disk, and a 1M-row backlog is never loaded into memory.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import structlog

from drivers.base import ByteSize, Duration, Range, Reading
from gatewayd.errors import QueueSchemaError, UplinkUnavailableError
from gatewayd.uplinks.base import Item, Lease
from gatewayd.worker import Worker

log = structlog.get_logger("gatewayd.queue")
T = TypeVar("T")

_SQLITE_MAGIC = b"SQLite format 3\x00"
_VT_NATIVE, _VT_BOOL, _VT_JSON, _VT_NULL = 0, 1, 2, 3
_ROW_OVERHEAD = 24  # approx. bytes per row beyond the value: seq, ts, sid, flags, b-tree cell
_GC_CHUNK = 50_000  # rows deleted per transaction, so GC never holds the writer for long
_MAX_UPLINKS = 62  # bits in the `off` column
_RESERVE = 100_000  # seqs reserved in the sidecar ahead of the tail (one fsync per this many)
_PROBE_ROWS = 1000  # a degraded queue probes the disk with a commit this small
_HOT_ROWS = 4096  # readings of the last commits kept in memory for live leases
# A confirmation through the tail waits for the next commit's transaction (see Outbox.confirm)
# at most this long before it is written alone.
_CURSOR_LINGER_S = 2.0

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26

StorageState = Literal["ok", "disk_full", "read_only", "io_error", "locked"]
STORAGE_STATES: tuple[StorageState, ...] = ("ok", "disk_full", "read_only", "io_error", "locked")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    commit_window: Duration = 0.02  # the longest a reading waits for its commit to start
    commit_max_rows: Annotated[int, Range(1, 1_000_000)] = 20_000  # commit early past this
    fsync: Literal["always", "normal", "off"] = "always"
    max_rows: Annotated[int, Range(1000, None)] = 10_000_000
    max_bytes: ByteSize = 1024**3
    max_age: Duration = 30 * 86400.0
    max_file_size: ByteSize = 0  # hard cap on the SQLite file (0: none); writes past it fail
    gc_interval: Duration = 5.0
    new_uplink_start: Literal["now", "oldest"] = "now"
    memory_buffer: Annotated[int, Range(0, None)] = 100_000  # held while the disk refuses writes
    integrity_check: Literal["quick", "off"] = "quick"


@dataclass(slots=True)
class Storage:
    """The queue's disk condition: `state` is "ok" or why writes fail, `since` when it began."""

    state: StorageState = "ok"
    since: float = 0.0  # epoch seconds
    detail: str = ""  # the last error text
    where: str = ""  # the write path that met it: append, ack, gc, open, ...
    held: int = 0  # readings waiting in memory for the disk
    dropped: int = 0  # readings dropped (memory buffer full) since the condition began
    acks_pending: int = 0  # uplink cursors confirmed but not yet written

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "ok": self.ok, "since": round(self.since, 3),
                "detail": self.detail, "where": self.where, "held": self.held,
                "dropped": self.dropped, "acks_pending": self.acks_pending}


class StorageFault(Exception):
    """A storage error the queue survives; wraps the OSError or sqlite3 error with its class."""

    def __init__(self, state: StorageState, detail: str) -> None:
        super().__init__(detail)
        self.state = state
        self.detail = detail


def _dir_read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def classify(exc: BaseException, path: Path | None = None) -> StorageState | None:
    """The storage condition an exception means, or None if it is not a storage error."""
    if isinstance(exc, StorageFault):
        return exc.state
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk_full"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return "read_only"
        return "io_error"
    if isinstance(exc, (sqlite3.OperationalError, sqlite3.DatabaseError)) and not isinstance(
            exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        text = str(exc).lower()
        if code == _SQLITE_FULL or "full" in text:
            return "disk_full"
        if code in (_SQLITE_READONLY, _SQLITE_PERM) or "readonly" in text or "read-only" in text:
            return "read_only"
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in text:
            return "locked"
        if code == _SQLITE_CANTOPEN and path is not None and _dir_read_only(path.parent):
            return "read_only"
        return "io_error"
    return None


def _is_corruption(exc: sqlite3.Error) -> bool:
    """True for "this file is damaged", as opposed to "the disk refuses" (never renamed aside)."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    if code:
        return False
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _load_ranges(text: Any, acked: int) -> list[tuple[int, int]]:
    """Confirmed ranges from their JSON column: sorted, merged, above `acked`; bad text is []."""
    try:
        pairs = [(int(a), int(b)) for a, b in json.loads(text or "[]")]
    except (TypeError, ValueError):
        log.warning("uplink_ranges_unreadable", text=str(text)[:80])
        return []
    return _merge_ranges(pairs, acked)


def _merge_ranges(pairs: Iterable[tuple[int, int]], acked: int) -> list[tuple[int, int]]:
    """Seq ranges sorted, overlapping or adjacent ones merged, the parts up to `acked` cut."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(pairs):
        a = max(a, acked + 1)
        if b < a:
            continue
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _fold_ranges(acked: int, done: list[tuple[int, int]], gaps: Sequence[tuple[int, int]]
                 ) -> tuple[int, list[tuple[int, int]]]:
    """Move the low-water mark `acked` over confirmed ranges (and state-loss gaps) that reach
    it; `done` is sorted and merged, above `acked`. Returns the new mark and what stays above."""
    i, moved = 0, True
    while moved:
        moved = False
        if i < len(done) and done[i][0] <= acked + 1:
            acked = max(acked, done[i][1])
            i += 1
            moved = True
        for g0, g1 in gaps:
            if g0 <= acked + 1 <= g1:
                acked, moved = g1, True
    return acked, [r for r in done[i:] if r[1] > acked]


def _migrate_1(db: sqlite3.Connection) -> None:
    """0 -> 1: the original layout (files from before versioning have user_version 0 and
    these tables already: IF NOT EXISTS leaves them and their rows as they are)."""
    db.execute("CREATE TABLE IF NOT EXISTS series(sid INTEGER PRIMARY KEY, dev TEXT NOT NULL,"
               " pt TEXT NOT NULL, UNIQUE(dev, pt))")
    db.execute("CREATE TABLE IF NOT EXISTS readings(seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL,"
               " sid INTEGER NOT NULL, val, vt INTEGER NOT NULL, q INTEGER NOT NULL,"
               " off INTEGER NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS cursors(name TEXT PRIMARY KEY, bit INTEGER NOT NULL,"
               " acked INTEGER NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v)")


def _migrate_2(db: sqlite3.Connection) -> None:
    """1 -> 2: the queue's identity and seq high-water mark live in `meta` (the sidecar compares
    them): give an older file its `queue_id`, and `last_seq` if it lacks one."""
    db.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('queue_id', ?)", (uuid.uuid4().hex,))
    db.execute("INSERT OR IGNORE INTO meta(k, v)"
               " SELECT 'last_seq', coalesce(max(seq), 0) FROM readings")


def _migrate_3(db: sqlite3.Connection) -> None:
    """2 -> 3: an uplink's confirmations are a low-water mark (`acked`) plus the confirmed seq
    ranges above it (`ranges`, JSON [[lo, hi], ...]): live-first delivery confirms out of order."""
    db.execute("ALTER TABLE cursors ADD COLUMN ranges TEXT NOT NULL DEFAULT '[]'")


# Ordered: _MIGRATIONS[n] takes a database from version n to n + 1. Append, never edit.
_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_1, _migrate_2, _migrate_3]
SCHEMA_VERSION = len(_MIGRATIONS)


class Queue:
    """The durable queue. `await open()`, run `run()` in the service's TaskGroup, `close()`."""

    def __init__(self, path: Path, config: QueueConfig, uplinks: Sequence[str] = (),
                 metrics: Any = None, starts: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.side_path = self.path.with_name(self.path.stem + ".state")
        self.config = config
        self._uplink_names = list(uplinks)
        self._starts = starts or {}
        self.metrics = metrics
        self._w = Worker("queue-writer")
        self._r = Worker("queue-reader")
        self._db: sqlite3.Connection | None = None  # writer thread only
        self._rdb: sqlite3.Connection | None = None  # reader thread only
        self._series: dict[tuple[str, str], int] = {}
        self._series_by_id: dict[int, tuple[str, str]] = {}
        self._pending: list[Reading] = []
        self._pending_futs: list[asyncio.Future[bool]] = []
        self._pending_sizes: list[int] = []  # readings per submit, in order
        self._retry: list[Reading] = []  # readings the disk refused, held for the next commit
        self._inflight = 0  # held readings in a probe commit right now
        # cursors confirmed in memory but not yet written: name -> (acked, ranges as JSON)
        self._dirty: dict[str, tuple[int, str]] = {}
        # confirmations through the tail, written with the next commit (Outbox.confirm); at
        # most one per uplink, never while the disk refuses writes (those go to _dirty)
        self._lazy: dict[str, tuple[int, str]] = {}
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._lazy_tasks: set[asyncio.Task[None]] = set()
        # a commit took its snapshot of the cursors and has not landed: a confirmation made now
        # would miss it, and the readings it lands could be leased before the one after it
        self._committing = False
        self._have_pending = asyncio.Event()
        self._full = asyncio.Event()  # the open batch reached commit_max_rows
        self._pending_since = 0.0  # when the open batch's first reading arrived (monotonic)
        # Polls under way (`poll_started` .. `poll_ended`): readings that will arrive shortly,
        # which the next commit waits for (within commit_window), as a database's group commit
        # waits for its siblings. `_polls_done` is set when none is left.
        self.polls_in_flight = 0
        self._polls_done: asyncio.Future[None] | None = None
        self._committed = asyncio.Condition()
        self._commit_lock = asyncio.Lock()  # one commit at a time: seq is assigned from `tail`
        self._outboxes: dict[str, Outbox] = {}
        self._hot: deque[tuple[int, list[Reading], int]] = deque()  # (first seq, batch, offline)
        self._hot_rows = 0
        self._opened = False  # the writer's database is open (False in a degraded start)
        self.head = 1  # first seq present (head > tail: empty)
        self.tail = 0  # last committed seq
        self.bytes_est = 0  # approximate bytes of rows present
        self.dropped_total = 0
        self.store_failed = 0  # readings never stored: the memory buffer was full
        self.state_lost = 0  # readings found lost at start (state loss)
        self.queue_id = ""
        self.storage = Storage(since=time.time())
        self.renamed_corrupt: Path | None = None
        self.probe_s = 1.0  # how often a degraded queue retries the disk
        # writer thread only:
        self._gaps: list[tuple[int, int]] = []  # seq ranges skipped after a state loss
        self._meta_dirty: dict[str, str] = {}  # meta rows still to write
        self._side: dict[str, Any] = {}  # the sidecar as last written
        self._reserved = 0  # seqs up to this may have been handed out (durable in the sidecar)
        self._rl = _RateLimitedLog()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._w.call(fn, *args)

    async def _on_reader(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._r.call(fn, *args)

    @property
    def store_error(self) -> str:
        """The current storage condition, "" when healthy (kept for older callers)."""
        return "" if self.storage.ok else self.storage.state

    async def open(self) -> None:
        """Open (or create, or replace a corrupt) database and load cursors.

        A state directory that refuses writes does not stop the start: the queue runs degraded
        (readings held in memory) and opens the database once the disk allows.
        """
        deferred: BaseException | None = None
        try:
            cursors, deferred = await self._on_writer(self._open_sync)
            await self._on_reader(self._open_reader_sync)
            self._opened = True
        except (sqlite3.Error, OSError) as exc:
            if classify(exc, self.path) is None:
                raise
            cursors = {name: (i, 0, []) for i, name in enumerate(self._uplink_names)}
            deferred = exc
        for name, (bit, acked, done) in cursors.items():
            self._outboxes[name] = Outbox(self, name, bit, acked, done)
        if self._opened:
            log.info("queue_opened", path=str(self.path), rows=self.rows, head=self.head,
                     tail=self.tail, uplinks=list(self._outboxes), fsync=self.config.fsync)
        self._update_storage_gauges()
        if deferred is not None:
            self._fault(deferred, "open", at_start=True)

    async def _reopen(self) -> None:
        """Open the database after a degraded start (raises the storage error if it still fails)."""
        cursors, deferred = await self._on_writer(self._open_sync)
        await self._on_reader(self._open_reader_sync)
        self._opened = True
        for name, (bit, acked, done) in cursors.items():
            ob = self._outboxes[name]
            ob.bit = bit
            ob.reset(acked, done)
            ob.live_from = self.tail + 1
        log.info("queue_opened", path=str(self.path), rows=self.rows, head=self.head,
                 tail=self.tail, uplinks=list(self._outboxes), fsync=self.config.fsync,
                 after_degraded_start=True)
        async with self._committed:
            self._committed.notify_all()
        if deferred is not None:
            raise deferred

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            sync = {"always": "FULL", "normal": "NORMAL", "off": "OFF"}[self.config.fsync]
            db.execute(f"PRAGMA synchronous={sync}")
            db.execute("PRAGMA cache_size=-4096")  # 4 MiB page cache: memory stays flat
            db.execute("PRAGMA temp_store=MEMORY")
            if self.config.max_file_size:
                page = db.execute("PRAGMA page_size").fetchone()[0]
                db.execute(f"PRAGMA max_page_count={max(16, self.config.max_file_size // page)}")
        except BaseException:
            db.close()
            raise
        return db

    def _is_corrupt(self) -> str:
        """Why the existing file is unusable, or "" if it is fine (or absent).

        Raises the error instead when the disk, not the file, is the problem (full, read-only,
        I/O error): a good database is never renamed aside because its disk is full.
        """
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
            if not _is_corruption(exc):
                raise
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

    # -- the sidecar ----------------------------------------------------------------------------

    def _read_sidecar(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.side_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("queue_sidecar_unreadable", path=str(self.side_path), error=str(exc))
            return None
        if not isinstance(data, dict) or not isinstance(data.get("queue_id"), str):
            log.error("queue_sidecar_unreadable", path=str(self.side_path), error="unexpected content")
            return None
        return data

    def _write_sidecar_sync(self, **fields: Any) -> None:
        """Replace the sidecar atomically (write, fsync, rename, fsync the directory)."""
        side = {**self._side, **fields, "written_ms": int(time.time() * 1000)}
        data = json.dumps(side, separators=(",", ":"), sort_keys=True).encode()
        tmp = self.side_path.with_name(self.side_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.side_path)
        _fsync_dir(self.side_path.parent)
        self._side = side

    def _sidecar_pass_sync(self, committed: int, acked: dict[str, int], clean: bool) -> None:
        """Record the committed mark (every GC pass and at shutdown) if anything changed."""
        if (self._side.get("committed") == committed and self._side.get("acked") == acked
                and self._side.get("clean") == clean):
            return
        self._write_sidecar_sync(committed=committed, acked=acked, clean=clean)

    # -- opening --------------------------------------------------------------------------------

    def _open_sync(self) -> tuple[dict[str, tuple[int, int, list[tuple[int, int]]]],
                                  BaseException | None]:
        """Open the database, detect state loss, load cursors.

        Returns the cursors and a storage error met on a write that may wait (the sidecar, a
        cursor insert): the queue is then open for delivery but degraded.
        """
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        side = self._read_sidecar()
        existed = self.path.exists() and self.path.stat().st_size > 0
        why = self._is_corrupt()
        if why:
            self._rename_aside(why)
            existed = False
        try:
            db = self._connect()
            self._create_schema(db)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            # Opened but unusable (e.g. a half-written schema): start afresh rather than refuse.
            self._rename_aside(f"cannot be used: {exc}")
            existed = False
            db = self._connect()
            self._create_schema(db)
        self._db = db
        self._series.clear()
        self._series_by_id.clear()
        for sid, dev, pt in db.execute("SELECT sid, dev, pt FROM series"):
            self._series[(dev, pt)] = sid
            self._series_by_id[sid] = (dev, pt)
        lo, hi = db.execute("SELECT min(seq), max(seq) FROM readings").fetchone()
        meta = {k: v for k, v in db.execute("SELECT k, v FROM meta")}
        db_tail = max(int(meta.get("last_seq") or 0), hi or 0)
        self._gaps = [(int(a), int(b)) for a, b in json.loads(meta.get("gaps") or "[]")]
        qid = str(meta.get("queue_id") or "")
        self._meta_dirty = {}
        if not qid:
            qid = side["queue_id"] if side is not None else uuid.uuid4().hex
            self._meta_dirty["queue_id"] = qid
        self.queue_id = qid
        tail = self._check_loss(side, existed, qid, db_tail)
        if tail > db_tail:
            self._gaps.append((db_tail + 1, tail))
            self._meta_dirty["last_seq"] = str(tail)
        self.tail = tail
        self.head = lo if lo is not None else tail + 1
        self._gaps = [g for g in self._gaps if g[1] >= self.head]
        if self._gaps or "gaps" in meta:
            self._meta_dirty["gaps"] = json.dumps(self._gaps)
        self.bytes_est = self._bytes_between(db, self.head, self.tail)
        cursors, deferred = self._reconcile_cursors(db)
        self._side = {"format": 1, "queue_id": qid, "committed": tail,
                      "reserved": max(int((side or {}).get("reserved", 0)), tail + _RESERVE),
                      "acked": {n: a for n, (_, a, _r) in cursors.items()}, "clean": False,
                      "fsync": self.config.fsync}
        try:
            self._write_sidecar_sync()
            self._reserved = int(self._side["reserved"])
        except OSError as exc:
            self._reserved = tail  # not durable: the next commit writes it first
            deferred = deferred or exc
        return cursors, deferred

    def _check_loss(self, side: dict[str, Any] | None, existed: bool, qid: str, db_tail: int) -> int:
        """Compare the database with the sidecar; returns the tail to continue numbering from."""
        if side is None:
            return db_tail
        mark = int(side.get("committed", 0))
        reserved = max(int(side.get("reserved", 0)), mark)
        if reserved == 0 and mark == 0:
            return db_tail  # the old queue never numbered a reading
        acked = [int(a) for a in (side.get("acked") or {}).values()]
        reason = ""
        if not existed:
            reason = "database missing or empty"
        elif side.get("queue_id") != qid:
            reason = "database belongs to another queue (identity differs from the sidecar's)"
        elif db_tail < mark:
            reason = "database ends below the last committed seq"
        if reason:
            floor = max(db_tail if existed else 0, min(acked, default=0))
            lost = max(0, mark - floor)
            self.state_lost += lost
            if self.metrics is not None:
                self.metrics.state_lost.inc(lost)
            log.error("queue_state_lost", lost=lost, reason=reason, db_tail=db_tail,
                      committed_mark=mark, continue_at=max(db_tail, reserved) + 1,
                      path=str(self.path), sidecar=str(self.side_path),
                      message=f"{lost} committed readings (not confirmed delivered when the "
                              "sidecar was last written) are gone from the queue database; "
                              "numbering continues above every seq ever used")
            return max(db_tail, reserved)
        if not side.get("clean", False) and self.config.fsync != "always" and db_tail < reserved:
            # With fsync "normal" an unclean stop may have rolled back commits after the mark
            # without a trace; skip their seqs so none is given to a second reading.
            log.warning("queue_seq_skipped", reason=f"unclean stop with fsync={self.config.fsync}",
                        db_tail=db_tail, continue_at=reserved + 1)
            return reserved
        return db_tail

    def _create_schema(self, db: sqlite3.Connection) -> None:
        """Bring the database to SCHEMA_VERSION (`PRAGMA user_version`) by ordered migrations,
        in one transaction. A newer version than this code knows raises QueueSchemaError."""
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise QueueSchemaError(str(self.path), found, SCHEMA_VERSION)
        if found == SCHEMA_VERSION:
            return
        fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for version in range(found, SCHEMA_VERSION):
                _MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if not fresh:
            log.info("queue_schema_migrated", path=str(self.path), from_version=found,
                     to_version=SCHEMA_VERSION)

    def _bytes_between(self, db: sqlite3.Connection, lo: int, hi: int) -> int:
        if hi < lo:
            return 0
        n, text = db.execute(
            "SELECT count(*), coalesce(sum(CASE WHEN typeof(val)='text' THEN length(val) ELSE 8 END),0)"
            " FROM readings WHERE seq BETWEEN ? AND ?", (lo, hi)).fetchone()
        return int(n) * _ROW_OVERHEAD + int(text)

    def _reconcile_cursors(self, db: sqlite3.Connection
                           ) -> tuple[dict[str, tuple[int, int, list[tuple[int, int]]]],
                                      BaseException | None]:
        existing = {n: (b, a, _load_ranges(r, a))
                    for n, b, a, r in db.execute("SELECT name, bit, acked, ranges FROM cursors")}
        wanted = self._uplink_names
        gone = set(existing) - set(wanted)
        used = {e[0] for n, e in existing.items() if n in wanted}
        out: dict[str, tuple[int, int, list[tuple[int, int]]]] = {}
        created: list[tuple[str, int, int]] = []
        for name in wanted:
            if name in existing:
                out[name] = existing[name]
                continue
            free = [b for b in range(_MAX_UPLINKS) if b not in used]
            if not free:
                raise ValueError(f"too many uplinks (at most {_MAX_UPLINKS})")
            bit = free[0]
            used.add(bit)
            start = self._starts.get(name, self.config.new_uplink_start)
            acked = self.tail if start == "now" else self.head - 1
            created.append((name, bit, acked))
            log.info("uplink_cursor_created", uplink=name, start=start, acked=acked)
            out[name] = (bit, acked, [])
        if not (gone or created or self._meta_dirty):
            return out, None
        try:
            db.execute("BEGIN")
            for name in gone:
                db.execute("DELETE FROM cursors WHERE name=?", (name,))
            db.executemany("INSERT INTO cursors(name, bit, acked) VALUES (?,?,?)", created)
            db.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES (?,?)",
                           list(self._meta_dirty.items()))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if classify(exc, self.path) is None:
                raise
            # The disk refuses: new cursors are written with the first commit it takes.
            self._dirty.update({name: (acked, "[]") for name, _, acked in created})
            return out, exc
        self._meta_dirty = {}
        for name in gone:
            log.info("uplink_cursor_dropped", uplink=name, acked=existing[name][1])
        return out, None

    def _open_reader_sync(self) -> None:
        if self._rdb is not None:
            self._rdb.close()
        self._rdb = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._rdb.execute("PRAGMA cache_size=-4096")

    async def close(self) -> None:
        """Commit what is pending, then close the database. Idempotent."""
        if self._closed:
            return
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._lazy_tasks:
            await asyncio.wait(list(self._lazy_tasks))
        if self._opened or self._retry or self._pending or self._lazy:
            await self.flush()
        self._closed = True
        for ob in self._outboxes.values():
            ob.closed = True
        async with self._committed:
            self._committed.notify_all()
        if self._retry or self._dirty:
            log.error("queue_closed_unstored", readings=len(self._retry), acks=dict(self._dirty),
                      condition=self.storage.state)
        acked = {n: ob.acked for n, ob in self._outboxes.items()}
        clean = not self._retry and not self._dirty and self._opened
        await self._on_reader(self._close_reader_sync)
        await self._on_writer(self._close_writer_sync, self.tail, acked, clean)
        self._w.close()
        self._r.close()
        log.info("queue_closed", tail=self.tail, rows=self.rows)

    def _close_reader_sync(self) -> None:
        if self._rdb is not None:
            self._rdb.close()
            self._rdb = None

    def _close_writer_sync(self, tail: int, acked: dict[str, int], clean: bool) -> None:
        if self._db is not None:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._db = None
            try:
                self._sidecar_pass_sync(tail, acked, clean)
            except OSError as exc:
                log.warning("queue_sidecar_not_written", error=str(exc))

    # -- storage condition ----------------------------------------------------------------------

    def _fault(self, exc: BaseException, where: str, at_start: bool = False) -> None:
        """A write failed for a storage reason: degrade (one log line per condition change)."""
        state = classify(exc, self.path) or "io_error"
        self._lazy_to_dirty()
        st = self.storage
        st.detail = str(exc)
        if state == st.state:
            return
        previous = st.state
        st.state, st.since, st.where = state, time.time(), where
        if previous == "ok":
            st.dropped = 0
        st.held, st.acks_pending = len(self._retry), len(self._dirty)
        log.error("queue_storage_degraded", condition=state, previous=previous, where=where,
                  error=str(exc), at_start=at_start, held_in_memory=len(self._retry),
                  memory_buffer=self.config.memory_buffer, path=str(self.path),
                  message=("the state directory refuses writes at start: " if at_start else
                           "the queue cannot write to disk: ")
                  + f"readings are held in memory (up to {self.config.memory_buffer}) and "
                  "written once the disk takes writes again")
        self._update_storage_gauges()
        self._have_pending.set()  # wake the commit loop into probing

    def _write_ok(self) -> None:
        """A write reached the disk: leave any degraded condition."""
        st = self.storage
        if st.ok:
            return
        log.warning("queue_storage_recovered", condition=st.state,
                    lasted_s=round(time.time() - st.since, 3), dropped=st.dropped,
                    held_in_memory=len(self._retry), acks_pending=len(self._dirty))
        st.state, st.since, st.where, st.detail = "ok", time.time(), "", ""
        self._update_storage_gauges()
        if self._retry or self._dirty:
            self._have_pending.set()

    def _update_storage_gauges(self) -> None:
        st = self.storage
        st.held, st.acks_pending = len(self._retry) + self._inflight, len(self._dirty)
        m = self.metrics
        if m is None:
            return
        m.queue_storage_ok.set(1 if st.ok else 0)
        for s in STORAGE_STATES:
            m.queue_storage_state.labels(s).set(1 if s == st.state else 0)
        m.queue_held.set(st.held)

    def _hold(self, batch: list[Reading]) -> None:
        """Keep readings in the bounded memory buffer; drop (and count) the oldest past it."""
        self._retry.extend(batch)
        over = len(self._retry) + self._inflight - self.config.memory_buffer
        if over > 0:
            del self._retry[:over]
            reason = self.storage.state if not self.storage.ok else "io_error"
            self.store_failed += over
            self.storage.dropped += over
            for ob in self._outboxes.values():
                ob.dropped[reason] = ob.dropped.get(reason, 0) + over
            if self.metrics is not None:
                self.metrics.store_failures.labels(reason).inc(over)
                for name in self._outboxes:
                    self.metrics.readings_dropped.labels(name, reason).inc(over)
        self.storage.held = len(self._retry) + self._inflight

    # -- appending ------------------------------------------------------------------------------

    def _count(self, lo: int, hi: int) -> int:
        """Rows with a seq in [lo, hi] that exist (or existed): seqs minus the skipped gaps."""
        n = hi - lo + 1
        if n <= 0:
            return 0
        for g0, g1 in self._gaps:
            a, b = max(lo, g0), min(hi, g1)
            if b >= a:
                n -= b - a + 1
        return n

    @property
    def rows(self) -> int:
        return self._count(self.head, self.tail)

    def outbox(self, name: str) -> Outbox:
        return self._outboxes[name]

    async def add_uplink(self, name: str, start: str | None = None) -> Outbox:
        """A cursor for an uplink added at run time (config reload); an existing one is kept."""
        if name in self._outboxes:
            return self._outboxes[name]
        if start:
            self._starts[name] = start
        self._uplink_names.append(name)
        if not self._opened or self._db is None:
            # Degraded start: the real cursor is made when the database opens (_reopen).
            used = {ob.bit for ob in self._outboxes.values()}
            bit = min(b for b in range(_MAX_UPLINKS) if b not in used)
            self._outboxes[name] = Outbox(self, name, bit, self.tail)
            return self._outboxes[name]
        cursors, deferred = await self._on_writer(self._reconcile_cursors, self._db)
        bit, acked, done = cursors[name]
        self._outboxes[name] = Outbox(self, name, bit, acked, done)
        if deferred is not None:
            self._fault(deferred, "cursor")  # the new cursor is written once the disk allows
        return self._outboxes[name]

    async def drop_uplink(self, name: str) -> None:
        """Forget a removed uplink's cursor (after the reload grace period): GC may pass it."""
        ob = self._outboxes.pop(name, None)
        if ob is None:
            return
        ob.closed = True
        self._uplink_names = [n for n in self._uplink_names if n != name]
        self._dirty.pop(name, None)
        self._lazy.pop(name, None)
        db = self._db
        if self._opened and db is not None:
            try:
                await self._on_writer(db.execute, "DELETE FROM cursors WHERE name=?", (name,))
            except (sqlite3.Error, OSError) as exc:
                if classify(exc, self.path) is None:
                    raise
                self._fault(exc, "cursor")  # the row goes at the next start (not configured)
        log.info("uplink_cursor_dropped", uplink=name, acked=ob.acked)

    @property
    def outboxes(self) -> dict[str, Outbox]:
        return self._outboxes

    def submit(self, readings: Iterable[Reading]) -> asyncio.Future[bool]:
        """Add readings to the open commit window; the future is True once they are durable.

        While the disk refuses writes the readings go straight to the memory buffer and the
        future is False (not durable yet; they are committed when the disk recovers).
        """
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_result(False)
            return fut
        if not self.storage.ok:
            self._hold(list(readings))
            fut.set_result(False)
            return fut
        before = len(self._pending)
        if not before:
            self._pending_since = time.monotonic()
        self._pending.extend(readings)
        self._pending_futs.append(fut)
        self._pending_sizes.append(len(self._pending) - before)
        if len(self._pending) >= self.config.commit_max_rows:
            self._full.set()
        self._have_pending.set()
        return fut

    def backpressure(self) -> bool:
        """True when producers outrun the disk: the open window is over its size cap."""
        return len(self._pending) > self.config.commit_max_rows

    async def put(self, readings: Iterable[Reading]) -> bool:
        """Append readings; returns after the commit (True), or False if the disk refused them."""
        return await self.submit(readings)

    async def flush(self) -> None:
        """Commit the open window (and anything held or unwritten) now.

        Always takes the commit lock, so a commit already in flight has landed on return.
        """
        await self._commit()
        while self._pending and self.storage.ok:  # past commit_max_rows: in several commits
            await self._commit()

    async def run(self) -> None:
        """The group-commit and GC loops. Runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._commit_loop(), name="queue-commit")
            tg.create_task(self._gc_loop(), name="queue-gc")

    def poll_started(self) -> None:
        """A producer began a poll whose readings it will `submit` (then `poll_ended`)."""
        self.polls_in_flight += 1

    def poll_ended(self) -> None:
        """The poll `poll_started` announced submitted its readings, failed or was cancelled."""
        self.polls_in_flight -= 1
        if self.polls_in_flight <= 0:
            self.polls_in_flight = 0
            done = self._polls_done
            if done is not None:
                self._polls_done = None
                if not done.done():
                    done.set_result(None)

    async def _commit_loop(self) -> None:
        """Adaptive group commit.

        A reading that arrives when the writer is idle commits at once, unless polls are under
        way (`poll_started`): then the commit waits for them to submit, so a burst of polls on
        a shared line (devices due in the same tick) costs one commit, one lease, one message
        and one confirmation instead of one each. Under a stream, commits start at most once
        per `commit_window`, and while a commit is in flight readings gather for the next one.
        Whatever it waits for, no reading waits more than `commit_window` for its commit to
        start: the window is a bound, never a fixed delay. (A batch that reached
        `commit_max_rows` ends a stream's wait at once, a wait for siblings at the window.)
        """
        last = -math.inf
        while True:
            if self.storage.ok:
                await self._have_pending.wait()
                await self._gather(last)
            else:
                await asyncio.sleep(self.probe_s)  # degraded: probe the disk now and then
            last = time.monotonic()
            await self._commit()

    async def _gather(self, last: float) -> None:
        """Wait until the open batch should commit (see `_commit_loop`)."""
        window = self.config.commit_window
        deadline = self._pending_since + window
        while len(self._pending) < self.config.commit_max_rows:
            now = time.monotonic()
            if now >= deadline:
                return
            waiting: Awaitable[Any]
            if now < last + window:  # a stream: one commit start per window (or a full batch)
                until = min(last + window, deadline)
                self._full.clear()
                waiting = self._full.wait()
            elif self.polls_in_flight > 0:  # siblings: readings that will arrive shortly
                until = deadline
                if self._polls_done is None:
                    self._polls_done = asyncio.get_running_loop().create_future()
                waiting = asyncio.shield(self._polls_done)  # shared: a timeout leaves it be
            else:
                return
            try:
                async with asyncio.timeout(until - now):
                    await waiting
            except TimeoutError:
                pass

    async def _commit(self) -> None:
        async with self._commit_lock:
            # Shielded: the writer thread finishes a commit even if this task is cancelled
            # (shutdown), so the seqs it wrote must be accounted for before giving up.
            job = asyncio.ensure_future(self._commit_locked())
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                await asyncio.wait([job])
                raise

    async def _commit_locked(self) -> None:
        futs = self._pending_futs
        if self.storage.ok and not self._retry and len(self._pending) > self.config.commit_max_rows:
            # Past commit_max_rows, whole submits up to the cap go now and the rest right after:
            # a producer waiting on its oldest submit sees it land without waiting for all.
            k, n = 0, 0
            for size in self._pending_sizes:
                if k and n + size > self.config.commit_max_rows:
                    break
                k, n = k + 1, n + size
            batch, futs = self._pending[:n], futs[:k]
            self._pending, self._pending_futs = self._pending[n:], self._pending_futs[k:]
            self._pending_sizes = self._pending_sizes[k:]
            self._have_pending.set()  # the rest commits next, at once
            await self._commit_batch(batch, futs)
            return
        if self.storage.ok:
            batch, rest = self._retry + self._pending, []
        else:  # a probe: what is held, a small slice first
            self._hold(self._pending)
            batch, rest = self._retry[:_PROBE_ROWS], self._retry[_PROBE_ROWS:]
        self._retry, self._pending, self._pending_futs = rest, [], []
        self._pending_sizes = []
        self._have_pending.clear()
        degraded = not self.storage.ok
        if degraded:
            self._inflight = len(batch)  # still held in memory (and counted) while it is tried
        try:
            await self._commit_batch(batch, futs)
        finally:
            if degraded:
                self._inflight = 0
                self._update_storage_gauges()

    async def _commit_batch(self, batch: list[Reading], futs: list[asyncio.Future[bool]]) -> None:
        if not batch and not self._dirty and not self._lazy and self._opened:
            for f in futs:
                if not f.done():
                    f.set_result(True)
            return
        offline = 0
        for ob in self._outboxes.values():
            if not ob.connected:
                offline |= 1 << ob.bit
        dirty = self._cursor_writes()
        started = time.perf_counter()
        self._committing = True
        try:
            if not self._opened:
                await self._reopen()
            first, last, nbytes = await self._on_writer(self._commit_sync, batch, offline, dirty)
        except (sqlite3.Error, OSError) as exc:
            if classify(exc, self.path) is None:
                raise
            self._retry = batch + self._retry
            self._inflight = 0  # back in the buffer
            self._fault(exc, "append" if batch else "ack")
            self._hold([])
            for f in futs:
                if not f.done():
                    f.set_result(False)
            return
        finally:
            self._committing = False  # (no await from here to the tail's advance below)
        self._clean_dirty(dirty)
        self._write_ok()
        if batch:
            if self.metrics is not None:
                self.metrics.commit_latency.observe(time.perf_counter() - started)
                self.metrics.readings_queued.inc(len(batch))
            self.tail = last
            self.bytes_est += nbytes
            self._keep_hot(first, batch, offline)
            log.debug("queue_committed", first_seq=first, last_seq=last, count=len(batch))
        if self._retry:
            self._have_pending.set()
        self._update_storage_gauges()
        if self.rows > self.config.max_rows or self.bytes_est > self.config.max_bytes:
            try:
                await self.enforce_caps()  # before put() returns: the caps hold afterwards
            except (sqlite3.Error, OSError) as exc:
                if classify(exc, self.path) is None:
                    raise
                self._fault(exc, "gc")
        for f in futs:
            if not f.done():
                f.set_result(True)
        async with self._committed:
            self._committed.notify_all()

    def _write_cursors(self, db: sqlite3.Connection, dirty: dict[str, tuple[int, str]]) -> None:
        for name, (acked, ranges) in dirty.items():
            ob = self._outboxes.get(name)
            if ob is None:
                continue
            db.execute("INSERT INTO cursors(name, bit, acked, ranges) VALUES (?,?,?,?)"
                       " ON CONFLICT(name) DO UPDATE SET acked=max(acked, excluded.acked),"
                       " ranges=excluded.ranges", (name, ob.bit, acked, ranges))

    def _write_cursors_sync(self, dirty: dict[str, tuple[int, str]]) -> None:
        db = self._db
        assert db is not None
        if self.config.fsync != "always":
            self._write_cursors(db, dirty)  # one autocommit statement per cursor
            return
        # A confirmation needs no fsync: if a power cut takes it, those readings are sent again
        # (a duplicate, never a loss). It still reaches the WAL at once, so a crash keeps it, and
        # the next commit's fsync makes it durable. Saves one fsync per delivered batch.
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._write_cursors(db, dirty)
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def _commit_sync(self, batch: list[Reading], offline: int, dirty: dict[str, tuple[int, str]]
                     ) -> tuple[int, int, int]:
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
            if seq > self._reserved:
                # Reserve seqs durably before using them: after a state loss numbering goes on
                # above every seq that could have been handed out.
                reserved = seq + _RESERVE
                self._write_sidecar_sync(reserved=reserved)
                self._reserved = reserved
            db.execute("BEGIN")
            if new_series:
                db.executemany("INSERT INTO series(sid, dev, pt) VALUES (?,?,?)", new_series)
            if rows:
                db.executemany("INSERT INTO readings(seq, ts, sid, val, vt, q, off)"
                               " VALUES (?,?,?,?,?,?,?)", rows)
                db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('last_seq', ?)", (seq,))
            if self._meta_dirty:
                db.executemany("INSERT OR REPLACE INTO meta(k, v) VALUES (?,?)",
                               list(self._meta_dirty.items()))
            self._write_cursors(db, dirty)
            db.execute("COMMIT")
        except (sqlite3.Error, OSError):
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for sid, dev, pt in new_series:
                del series[(dev, pt)]
                del self._series_by_id[sid]
            raise
        self._meta_dirty = {}
        return first, seq, nbytes

    # -- caps and GC ----------------------------------------------------------------------------

    async def enforce_caps(self) -> int:
        """Drop the oldest rows past max_rows / max_bytes / max_age. Returns rows dropped."""
        if not self._opened:
            return 0
        cut, reason = await self._on_writer(self._find_cut_sync)
        if cut < self.head:
            return 0
        return await self._drop_through(cut, reason)

    def _nth_seq(self, db: sqlite3.Connection, k: int) -> int:
        """The seq of the k-th row from the head (k >= 1)."""
        if not any(g[1] >= self.head for g in self._gaps):
            return self.head + k - 1
        row = db.execute("SELECT seq FROM readings WHERE seq >= ? ORDER BY seq LIMIT 1 OFFSET ?",
                         (self.head, k - 1)).fetchone()
        return int(row[0]) if row else self.tail

    def _find_cut_sync(self) -> tuple[int, str]:
        db = self._db
        assert db is not None
        cut, reason = self.head - 1, ""
        rows = self.rows
        if rows > self.config.max_rows:
            cut, reason = self._nth_seq(db, rows - self.config.max_rows), "max_rows"
        if self.bytes_est > self.config.max_bytes and rows:
            avg = self.bytes_est / rows
            excess_rows = min(rows, math.ceil((self.bytes_est - self.config.max_bytes) / avg))
            c = self._nth_seq(db, excess_rows)
            if c > cut:
                cut, reason = c, "max_bytes"
        cutoff_ms = int((time.time() - self.config.max_age) * 1000)
        if cut < self.tail:  # rows remain after the cut
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
                per_uplink[name] = ob.unconfirmed(max(ob.acked, self.head - 1) + 1, cut)
        first = self.head
        dirty = self._cursor_writes()
        removed_bytes = await self._on_writer(self._delete_through_sync, cut, per_uplink, dirty)
        self._clean_dirty(dirty)
        self._write_ok()
        n = self._count(first, cut)
        self.head = cut + 1
        self.bytes_est = max(0, self.bytes_est - removed_bytes)
        for name, count in per_uplink.items():
            ob = self._outboxes[name]
            ob.advance_to(cut)
            ob.dropped[reason] = ob.dropped.get(reason, 0) + count
            self.dropped_total += count
            if self.metrics is not None:
                self.metrics.readings_dropped.labels(name, reason).inc(count)
            self._rl.warning("queue_dropped_oldest", key=name + reason, uplink=name,
                             reason=reason, count=count, through_seq=cut)
        return n

    def _clean_dirty(self, written: dict[str, tuple[int, str]]) -> None:
        """`written` reached the disk: forget what it superseded."""
        for name, state in written.items():
            if self._dirty.get(name) == state:
                del self._dirty[name]
            if self._lazy.get(name) == state:
                del self._lazy[name]

    def _cursor_writes(self) -> dict[str, tuple[int, str]]:
        """The cursor states a write to the database carries along (a name is never in both)."""
        return {**self._lazy, **self._dirty} if self._lazy else dict(self._dirty)

    def _lazy_to_dirty(self) -> None:
        for name, state in self._lazy.items():
            self._dirty.setdefault(name, state)
        self._lazy.clear()

    def _defer_cursor(self, name: str, state: tuple[int, str]) -> None:
        """Keep a confirmation for the next commit's transaction (or the linger timer)."""
        self._lazy[name] = state
        if self._lazy_timer is None and not self._closed:
            self._lazy_timer = asyncio.get_running_loop().call_later(
                _CURSOR_LINGER_S, self._lazy_due)

    def _lazy_due(self) -> None:
        self._lazy_timer = None
        if self._lazy and not self._closed:
            task = asyncio.ensure_future(self._flush_lazy())
            self._lazy_tasks.add(task)
            task.add_done_callback(self._lazy_tasks.discard)

    async def _flush_lazy(self) -> None:
        """No commit came within the linger time: write the waiting confirmations alone."""
        states = dict(self._lazy)
        if not states or not (self.storage.ok and self._opened):
            return
        try:
            await self._on_writer(self._write_cursors_sync, states)
        except (sqlite3.Error, OSError) as exc:
            if classify(exc, self.path) is None:
                log.exception("queue_cursor_write_failed", uplinks=sorted(states))
                return  # still waiting in _lazy: the next commit writes them
            self._fault(exc, "ack")
            return
        self._clean_dirty(states)
        self._write_ok()

    def _delete_through_sync(self, cut: int, per_uplink: dict[str, int],
                             dirty: dict[str, tuple[int, str]]) -> int:
        db = self._db
        assert db is not None
        removed = self._bytes_between(db, self.head, cut)
        lo = self.head
        db.execute("BEGIN")
        try:
            self._write_cursors(db, dirty)
            for name in per_uplink:
                db.execute("UPDATE cursors SET acked=max(acked, ?) WHERE name=?", (cut, name))
            while lo <= cut:
                hi = min(cut, lo + _GC_CHUNK - 1)
                db.execute("DELETE FROM readings WHERE seq BETWEEN ? AND ?", (lo, hi))
                lo = hi + 1
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return removed

    async def collect(self) -> int:
        """Delete rows every uplink has acked (a chunk at a time). Returns rows deleted."""
        if not self._opened:
            return 0
        done = min((ob.acked for ob in self._outboxes.values()), default=self.tail)
        if done < self.head:
            return 0
        cut = min(done, self.head + _GC_CHUNK - 1)
        dirty = self._cursor_writes()
        removed = await self._on_writer(self._delete_through_sync, cut, {}, dirty)
        self._clean_dirty(dirty)
        self._write_ok()
        n = self._count(self.head, cut)
        self.head = cut + 1
        self.bytes_est = max(0, self.bytes_est - removed)
        return n

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc_interval)
            await self.gc_pass()
            self.update_gauges()

    async def gc_pass(self) -> None:
        """Caps, collection and the sidecar's committed mark; storage errors degrade."""
        if not self._opened:
            return
        try:
            await self.enforce_caps()
            while await self.collect() >= _GC_CHUNK:
                await asyncio.sleep(0)
            acked = {n: ob.acked for n, ob in self._outboxes.items()}
            await self._on_writer(self._sidecar_pass_sync, self.tail, acked, False)
        except (sqlite3.Error, OSError) as exc:
            if classify(exc, self.path) is None:
                raise
            self._fault(exc, "gc")

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

    def _keep_hot(self, first: int, batch: list[Reading], offline: int) -> None:
        """Keep the last commits' readings (at most _HOT_ROWS) for live leases: a lane that
        follows the tail is served from memory, without a reader-thread hop and a decode."""
        hot = self._hot
        hot.append((first, batch, offline))
        self._hot_rows += len(batch)
        while len(hot) > 1 and self._hot_rows - len(hot[0][1]) >= _HOT_ROWS:
            self._hot_rows -= len(hot.popleft()[1])
        if self._hot_rows > _HOT_ROWS * 4:  # one huge commit: not worth keeping
            hot.clear()
            self._hot_rows = 0

    def _lease_hot(self, after: int, upto: int, max_items: int, max_bytes: int, bit: int,
                   live_from: int, backlog: bool | None) -> list[Item] | None:
        """`_lease_sync` from the hot commits, or None when they do not hold seq `after + 1`."""
        hot = self._hot
        if not hot or hot[0][0] > after + 1 or after >= upto:
            return None
        mask = 1 << bit
        out: list[Item] = []
        total = 0
        for first, batch, offline in hot:
            end = first + len(batch) - 1
            if end <= after:
                continue
            off = bool(offline & mask)
            for i in range(max(0, after + 1 - first), len(batch)):
                seq = first + i
                if seq > upto or len(out) >= max_items:
                    return out
                r = batch[i]
                if max_bytes:
                    v = r.value
                    total += _ROW_OVERHEAD + (len(v) if isinstance(v, str) else 8)
                    if total > max_bytes and out:
                        return out
                out.append(Item(seq, r, (off or seq < live_from) if backlog is None else backlog))
        return out

    def _lease_sync(self, after: int, upto: int, max_items: int, max_bytes: int, bit: int,
                    live_from: int, backlog: bool | None = None) -> list[Item]:
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
            out.append(Item(seq, Reading(dev, pt, val, ts, q),
                            (bool(off & mask) or seq < live_from) if backlog is None else backlog))
        return out

    def oldest_ts_ms(self, after_seq: int) -> int | None:
        """Sampling time of the first row after `after_seq` (reader thread)."""
        db = self._rdb
        if db is None:
            return None
        try:
            row = db.execute("SELECT ts FROM readings WHERE seq > ? ORDER BY seq LIMIT 1",
                             (after_seq,)).fetchone()
        except sqlite3.Error:
            return None
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
                "backlog_rows": ob.backlog_rows(),
                "ranges": len(ob.ranges()),  # unconfirmed runs (outages not yet drained)
                "confirmed_ranges": len(ob.done),
                "connected": ob.connected,
                "dropped": dict(ob.dropped),
                "quarantined": dict(ob.quarantined),
            }
        return out

    def storage_condition(self) -> dict[str, Any]:
        """The storage condition for the status page: `condition` plus the details."""
        return {"condition": self.storage.state, **self.storage.as_dict(),
                "store_failed": self.store_failed}

    def status(self) -> dict[str, Any]:
        """The queue's part of /status."""
        return {
            "rows": self.rows, "head_seq": self.head, "tail_seq": self.tail,
            "bytes_approx": self.bytes_est, "fsync": self.config.fsync,
            "storage": self.storage.as_dict(), "store_error": self.store_error,
            "store_failed": self.store_failed, "dropped": self.dropped_total,
            "state_lost": self.state_lost, "queue_id": self.queue_id,
            "corrupt_file_moved_to": str(self.renamed_corrupt) if self.renamed_corrupt else None,
        }

    def update_gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.queue_rows.set(self.rows)
        self._update_storage_gauges()
        avg = self.bytes_est / self.rows if self.rows else 0
        for name, ob in self._outboxes.items():
            self.metrics.backlog_rows.labels(name).set(ob.pending())
            self.metrics.backlog_bytes.labels(name).set(int(ob.pending() * avg))


class _Deferred(Exception):
    """The ack waits in memory: the disk is known to refuse writes."""


MAX_RANGES = 256  # confirmed ranges kept per uplink; past it the smallest is forgotten (resent)


class Lane:
    """One ordered stream over part of an uplink's unconfirmed rows.

    `all`: everything in queue order (the single-lane uplinks, e.g. the jsonl archive).
    `live`: what was committed since the current connection began (`lo` = its live_from).
    `backlog`: everything older (`hi` = live_from - 1), oldest first, skipping what an earlier
    connection's live lane already confirmed. A lane leases in seq order and confirms in order:
    `ack(seq)` confirms everything of this lane up to `seq`.
    """

    def __init__(self, outbox: Outbox, kind: str, lo: int, hi: int | None) -> None:
        self.outbox = outbox
        self.kind = kind
        self.lo, self.hi = lo, hi  # seqs [lo, hi]; hi None: open-ended
        self.pos = lo - 1  # last seq leased
        self.acked_to = lo - 1  # last seq confirmed through this lane
        self.finished = False  # a bounded lane with nothing left
        self.flag: bool | None = {"live": False, "backlog": True}.get(kind)

    @property
    def backlog(self) -> bool:
        return self.kind == "backlog"

    def rewind(self) -> None:
        self.pos = self.acked_to

    def available(self) -> int:
        """Unconfirmed rows of this lane not yet leased."""
        q = self.outbox.queue
        hi = q.tail if self.hi is None else min(self.hi, q.tail)
        return self.outbox.unconfirmed(max(self.pos, self.outbox.acked) + 1, hi)

    def remaining(self) -> int:
        """Unconfirmed rows of this lane (leased or not)."""
        q = self.outbox.queue
        hi = q.tail if self.hi is None else min(self.hi, q.tail)
        return self.outbox.unconfirmed(max(self.lo - 1, self.outbox.acked) + 1, hi)

    async def lease(self, max_items: int, max_bytes: int = 0, wait_s: float | None = None,
                    linger_s: float = 0.0) -> Lease:
        ob, q = self.outbox, self.outbox.queue
        while True:
            if ob.closed:
                raise UplinkUnavailableError("the queue is closed")
            after = max(self.pos, ob.acked, self.lo - 1)
            a, b = ob.next_span(after)
            if self.hi is not None:
                if a > self.hi or a > q.tail:
                    self.finished = True
                    return Lease(ob.name, [])
            else:
                if not await q.wait_committed(a - 1, wait_s) or ob.closed:
                    return Lease(ob.name, [])
                if linger_s > 0 and q.tail - (a - 1) < max_items:
                    # A trickle: wait a little for a fuller batch (fewer wake-ups and messages).
                    await q.wait_committed(a - 1 + max_items - 1, linger_s)
            upto = q.tail if b is None else min(b, q.tail)
            if self.hi is not None:
                upto = min(upto, self.hi)
            try:
                items = q._lease_hot(a - 1, upto, max_items, max_bytes, ob.bit, ob.live_from,
                                     self.flag)
                if items is None:
                    items = await q._on_reader(q._lease_sync, a - 1, upto, max_items, max_bytes,
                                               ob.bit, ob.live_from, self.flag)
            except sqlite3.Error as exc:
                q._rl.warning("queue_read_failed", key=ob.name, uplink=ob.name, error=str(exc))
                await asyncio.sleep(min(1.0, wait_s if wait_s is not None else 1.0))
                return Lease(ob.name, [])
            if items:
                self.pos = items[-1].seq
                return Lease(ob.name, items)
            # No rows in [a, upto]: seqs a state loss skipped, or rows the caps removed meanwhile.
            # Nothing there to deliver: confirm the span so the low-water mark can pass it.
            self.pos = upto
            if self.acked_to == a - 1:
                self.acked_to = upto
            await ob.confirm(a, upto)
            if wait_s is not None and wait_s <= 0 and self.hi is None:
                return Lease(ob.name, [])

    async def ack(self, seq: int) -> None:
        if seq <= self.acked_to:
            return
        lo = self.acked_to + 1
        self.acked_to = seq
        await self.outbox.confirm(lo, seq)


class Outbox:
    """One uplink's confirmations over the queue. See `gatewayd.uplinks.base.Outbox` for the
    contract.

    What the uplink's cloud confirmed is `acked` (everything up to it) plus `done`, the
    confirmed ranges above it: live-first delivery confirms new readings before old ones, so
    confirmations are ranges, not one cursor. Both are durable (the `cursors` row) and survive
    a restart: nothing confirmed is resent, nothing unconfirmed is lost. Adjacent ranges merge
    and fold into `acked`; at most MAX_RANGES are kept (past that the smallest is forgotten and
    its readings are sent again: a duplicate, never a loss).

    `lanes(split)` gives a connection its lanes (`Lane`); `lease`/`ack`/`rewind` below are the
    single `all` lane. Never raises a storage error into an uplink: a failed cursor write keeps
    the confirmation in memory (written with the next write the disk takes), a failed read
    returns an empty lease.
    """

    def __init__(self, queue: Queue, name: str, bit: int, acked: int,
                 done: Sequence[tuple[int, int]] = ()) -> None:
        self.queue = queue
        self.name = name
        self.bit = bit
        self.connected = False
        self.live_from = queue.tail + 1  # seqs below this are backlog for the current connection
        self.dropped: dict[str, int] = {}
        self.quarantined: dict[str, int] = {}
        self.forgotten = 0  # confirmed readings forgotten past MAX_RANGES (sent again)
        self.watchers: list[Callable[[], None]] = []  # called after every confirmation
        self.closed = False
        self._ack_lock = asyncio.Lock()
        self.acked = acked
        self.done: list[tuple[int, int]] = []
        self._default = Lane(self, "all", acked + 1, None)
        self._lanes: list[Lane] = [self._default]
        self.reset(acked, done)

    def reset(self, acked: int, done: Sequence[tuple[int, int]] = ()) -> None:
        """Load the durable confirmations (at open, or after a degraded start)."""
        # the confirmed low-water mark (durable unless in queue._dirty) and the ranges above it
        self.acked, self.done = _fold_ranges(acked, _merge_ranges(done, acked), self.queue._gaps)
        self._default = Lane(self, "all", self.acked + 1, None)
        self._lanes = [self._default]

    # -- the confirmed set -------------------------------------------------------------------

    def next_span(self, after: int) -> tuple[int, int | None]:
        """The first unconfirmed seq after `after` and the last of its run (None: open)."""
        a = max(after, self.acked) + 1
        for d0, d1 in self.done:
            if d1 < a:
                continue
            if d0 <= a:
                a = d1 + 1
                continue
            return a, d0 - 1
        return a, None

    def unconfirmed(self, lo: int, hi: int) -> int:
        """Rows with a seq in [lo, hi] not yet confirmed."""
        q = self.queue
        lo = max(lo, self.acked + 1)
        n = q._count(lo, hi)
        if n <= 0:
            return 0
        for d0, d1 in self.done:
            if d0 > hi:
                break
            a, b = max(lo, d0), min(hi, d1)
            if b >= a:
                n -= q._count(a, b)
        return n

    def _with(self, lo: int, hi: int) -> tuple[int, list[tuple[int, int]]]:
        """(acked, done) after confirming [lo, hi], without changing this outbox."""
        acked, done = _fold_ranges(self.acked, _merge_ranges([*self.done, (lo, hi)], self.acked),
                                   self.queue._gaps)
        while len(done) > MAX_RANGES:
            # Bounded memory: forget the smallest confirmed range (its readings go again).
            small = min(range(len(done)), key=lambda i: done[i][1] - done[i][0])
            d0, d1 = done.pop(small)
            self.forgotten += self.queue._count(d0, d1)
            self.queue._rl.warning("uplink_ranges_compacted", key=self.name, uplink=self.name,
                                   resent=self.queue._count(d0, d1), ranges=MAX_RANGES,
                                   message="more confirmed ranges than kept: the smallest is "
                                           "forgotten and its readings are sent again")
        return acked, done

    def advance_to(self, cut: int) -> None:
        """Everything up to `cut` is settled (the caps dropped it): move past it."""
        if cut > self.acked:
            self.acked, self.done = _fold_ranges(cut, _merge_ranges(self.done, cut),
                                                 self.queue._gaps)

    def ranges(self) -> list[tuple[int, int]]:
        """The unconfirmed seq ranges up to the tail (what is still to deliver), oldest first."""
        out: list[tuple[int, int]] = []
        after = self.acked
        tail = self.queue.tail
        while after < tail:
            a, b = self.next_span(after)
            if a > tail:
                break
            b = tail if b is None else min(b, tail)
            out.append((a, b))
            after = b
        return out

    async def confirm(self, lo: int, hi: int) -> None:
        """The cloud confirmed seqs [lo, hi] (durable, or kept in memory while the disk refuses)."""
        async with self._ack_lock:
            lo = max(lo, self.acked + 1)
            if hi < lo:
                return
            q = self.queue
            newly = self.unconfirmed(lo, hi)
            acked, done = self._with(lo, hi)
            state = (acked, json.dumps([list(r) for r in done], separators=(",", ":")))
            lazy = q._lazy
            try:
                if not (q.storage.ok and q._opened):
                    raise _Deferred
                if (hi >= q.tail and not q._committing and self.name not in lazy
                        and self.name not in q._dirty):
                    # Through the tail: anything leased after this needs a commit first, and
                    # that commit writes this cursor in its own transaction, for free. So
                    # only a crash before the next commit (or the linger timer) can undo this
                    # confirmation, and then just this one batch is sent again, with nothing
                    # of this uplink in flight behind it. (While a commit is in flight its
                    # snapshot of the cursors is taken, and what it lands could be leased
                    # before the next one: so then the write is made at once, as below.)
                    # A power cut is no worse than before:
                    # a cursor write alone never waited for an fsync either.
                    q._defer_cursor(self.name, state)
                else:
                    lazy.pop(self.name, None)  # this write carries the waiting one along
                    await q._on_writer(q._write_cursors_sync, {self.name: state})
                    q._dirty.pop(self.name, None)  # superseded: never write the older state
            except _Deferred:
                lazy.pop(self.name, None)
                q._dirty[self.name] = state  # written with the first write the disk takes
                q.storage.acks_pending = len(q._dirty)
            except (sqlite3.Error, OSError) as exc:
                if classify(exc, q.path) is None:
                    raise
                q._dirty[self.name] = state
                q._fault(exc, "ack")
            else:
                q._write_ok()
            # Confirmed deliveries count at once even if only memory holds them yet: the next
            # lease goes on after them, and they are written once the disk takes writes.
            self.acked, self.done = acked, done
            if q.metrics is not None and newly:
                q.metrics.readings_acked.labels(self.name).inc(newly)
            for watch in self.watchers:
                watch()

    # -- lanes -------------------------------------------------------------------------------

    def lanes(self, split: bool) -> list[Lane]:
        """The lanes for a new connection: [all], or [live, backlog] with `split` (live first:
        new readings never wait behind the backlog)."""
        if not split:
            self._default.rewind()
            self._lanes = [self._default]
            return [self._default]
        live = Lane(self, "live", self.live_from, None)
        backlog = Lane(self, "backlog", self.acked + 1, self.live_from - 1)
        self._lanes = [self._default, live, backlog]
        return [live, backlog]

    def backlog_rows(self) -> int:
        """Unconfirmed rows older than the current connection (everything, while offline)."""
        if not self.connected:
            return self.pending()
        return self.unconfirmed(self.acked + 1, min(self.live_from - 1, self.queue.tail))

    # -- the single-lane contract ------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._default.pos

    async def lease(self, max_items: int, max_bytes: int = 0, wait_s: float | None = None,
                    linger_s: float = 0.0) -> Lease:
        return await self._default.lease(max_items, max_bytes, wait_s, linger_s)

    async def ack(self, seq: int) -> None:
        """Everything up to `seq` is confirmed."""
        lane = self._default
        lane.acked_to = max(lane.acked_to, seq)
        await self.confirm(self.acked + 1, seq)

    def rewind(self) -> None:
        for lane in self._lanes:
            lane.rewind()

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
        return self.unconfirmed(self.acked + 1, self.queue.tail)
