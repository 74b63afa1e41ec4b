"""The jsonl uplink: delivery through the real queue, rotation, and pause/backlog."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from drivers.base import Reading
from gatewayd.queue import Queue, QueueConfig
from gatewayd.uplinks.base import UplinkContext, UplinkState
from gatewayd.uplinks.jsonl import JsonlConfig, JsonlUplink


async def test_delivers_rotates_and_acks(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q.db", QueueConfig(commit_window=0.01), ["arch"])
    await q.open()
    pause = tmp_path / "pause"
    pause.touch()
    up = JsonlUplink("arch", JsonlConfig(path="a.jsonl", rotate_bytes=20_000, keep=2, batch=100,
                                         pause_file=str(pause), retry_max=0.05),
                     UplinkContext("gw", tmp_path, q.outbox("arch"), lambda c: None))
    tasks = [asyncio.create_task(q.run()), asyncio.create_task(up.run())]
    try:
        await q.put([Reading("d", "p", float(i), 1000 + i) for i in range(500)])
        async with asyncio.timeout(5):
            while up.state != UplinkState.BACKING_OFF:
                await asyncio.sleep(0.005)
        assert not (tmp_path / "a.jsonl").exists() and q.outbox("arch").pending() == 500
        pause.unlink()
        async with asyncio.timeout(10):
            while q.outbox("arch").pending():
                await asyncio.sleep(0.01)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await q.close()
    files = [tmp_path / "a.jsonl", tmp_path / "a.jsonl.1", tmp_path / "a.jsonl.2"]
    assert all(f.exists() for f in files) and not (tmp_path / "a.jsonl.3").exists()
    assert all(f.stat().st_size <= 20_000 for f in files)
    rows = [json.loads(x) for f in reversed(files) for x in f.read_text().splitlines()]
    seqs = [r["seq"] for r in rows]
    assert seqs == sorted(seqs) and seqs[-1] == 500  # oldest rotated away, newest kept in order
    assert all(r["backlog"] for r in rows)  # queued while the archive was paused
    assert rows[-1] == {"seq": 500, "device": "d", "point": "p", "value": 499.0, "ts_ms": 1499,
                        "quality": 0, "backlog": True}


async def test_line_half_written_by_a_crash_is_cut_before_appending(tmp_path: Path) -> None:
    """A SIGKILL mid-write leaves a partial last line; the next batch must not be glued onto it."""
    archive = tmp_path / "a.jsonl"
    whole = json.dumps({"seq": 1, "device": "d", "point": "p", "value": 0.0, "ts_ms": 1000,
                        "quality": 0, "backlog": False}) + "\n"
    archive.write_text(whole + '{"seq":2,"device":"d","po')  # the crash cut the second line
    q = Queue(tmp_path / "q.db", QueueConfig(commit_window=0.01), ["arch"])
    await q.open()
    up = JsonlUplink("arch", JsonlConfig(path="a.jsonl", batch=10),
                     UplinkContext("gw", tmp_path, q.outbox("arch"), lambda c: None))
    tasks = [asyncio.create_task(q.run()), asyncio.create_task(up.run())]
    try:
        await q.put([Reading("d", "p", float(i), 2000 + i) for i in range(3)])
        async with asyncio.timeout(10):
            while q.outbox("arch").pending():
                await asyncio.sleep(0.01)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await q.close()
    lines = archive.read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # every line parses
    assert lines[0] == whole.rstrip("\n")
    assert [r["ts_ms"] for r in rows] == [1000, 2000, 2001, 2002]
