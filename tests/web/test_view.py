"""The queue's storage condition as the page shows it, from either queue API."""

from __future__ import annotations

from pathlib import Path

from gatewayd.queue import Queue, QueueConfig
from gatewayd.web.view import storage_condition


async def test_condition_from_a_real_queue(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue.db", QueueConfig(), ["a"])
    await q.open()
    try:
        assert storage_condition(q)["condition"] == "ok"
    finally:
        await q.close()


def test_condition_from_the_storage_api() -> None:
    class Storage:  # the shape of the queue's storage-condition API (state, since, detail, ...)
        def as_dict(self) -> dict[str, object]:
            return {"state": "disk_full", "ok": False, "since": 12.5, "detail": "database or disk is full",
                    "where": "append", "held": 176, "dropped": 0, "acks_pending": 1}

    class Q:
        storage = Storage()
        store_error = "disk_full"

    got = storage_condition(Q())
    assert got["condition"] == "disk_full" and got["held"] == 176 and got["where"] == "append"
