"""The `jsonl` uplink: appends delivered readings as JSON lines to a file, with rotation.

A local archive for users, and the simplest end-to-end check of the queue and the delivery
engine (`gatewayd.uplinks.engine`). Each line is
`{"seq", "device", "point", "value", "ts_ms", "quality", "backlog"}`.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import structlog

from drivers.base import ByteSize, CommandResult, Duration, Range
from gatewayd.errors import UplinkUnavailableError
from gatewayd.uplinks.base import UplinkContext
from gatewayd.uplinks.engine import ACCEPTED, DeliveryUplink, Packet, Session, Verdict
from gatewayd.worker import Worker

log = structlog.get_logger("gatewayd.uplink.jsonl")


@dataclass(frozen=True, slots=True)
class JsonlConfig:
    path: str  # relative paths are inside the state directory
    rotate_bytes: ByteSize = 64 * 1024**2  # rotate to .1, .2, ... past this size
    keep: Annotated[int, Range(0, 1000)] = 5  # rotated files kept
    batch: Annotated[int, Range(1, 100_000)] = 1000  # readings per write
    fsync: bool = False  # fsync each batch before acking (survives power loss)
    pause_file: str = ""  # while this file exists, delivery pauses and a backlog builds
    retry_max: Duration = 30.0
    linger: Duration = 1.0  # under load, wait up to this for a full batch: fewer writes

    def check(self, devices: set[str]) -> list[str]:
        return []  # names no devices


class JsonlUplink(DeliveryUplink):
    """Writes each leased batch, then acks it. A write error is retried with backoff."""

    Config = JsonlConfig
    split_lanes = False  # an archive keeps queue order: one lane

    def __init__(self, name: str, config: JsonlConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        p = Path(config.path)
        self.path = p if p.is_absolute() else ctx.state_dir / p
        self.replies: list[CommandResult] = []
        self.batch, self.linger_s = config.batch, config.linger
        self.backoff_base_s, self.backoff_cap_s = 0.2, config.retry_max

    async def connect(self) -> Session:
        await asyncio.to_thread(self._check_pause)
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(self._repair_tail)
        return _FileSession(self)

    def _repair_tail(self) -> None:
        """Cut a line left half-written by a crash (its readings were never acked, so they go again).

        Without this the next batch would be appended to the partial line, making it unreadable.
        """
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            end = size
            while end > 0:
                start = max(0, end - 65536)
                chunk = os.pread(fd, end - start, start)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    end = start + nl + 1
                    break
                end = start
            if end < size:
                os.ftruncate(fd, end)
                log.warning("jsonl_partial_line_cut", uplink=self.name, path=str(self.path),
                            bytes=size - end)
        finally:
            os.close(fd)

    def _check_pause(self) -> None:
        if self.config.pause_file and os.path.exists(self.config.pause_file):
            raise UplinkUnavailableError(f"paused: {self.config.pause_file} exists")

    def _write(self, data: bytes) -> None:
        self._check_pause()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.config.rotate_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.config.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        keep = self.config.keep
        if keep == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def status(self) -> dict[str, Any]:
        return {**super().status(), "path": str(self.path)}


class _FileSession(Session):
    def __init__(self, uplink: JsonlUplink) -> None:
        self._write = uplink._write
        self._path = uplink.path
        self._replies = uplink.replies
        # Its own writer thread: the default executor's hand-off costs twice the CPU per batch.
        self._worker = Worker(f"jsonl-{uplink.name}")

    async def send(self, packet: Packet) -> Verdict:
        lines = "".join(
            json.dumps({"seq": it.seq, "device": it.reading.device, "point": it.reading.point,
                        "value": it.reading.value, "ts_ms": it.reading.ts_ms,
                        "quality": it.reading.quality, "backlog": it.backlog},
                       separators=(",", ":")) + "\n"
            for it in packet.items)
        try:
            await self._worker.call(self._write, lines.encode())
        except OSError as exc:
            raise UplinkUnavailableError(f"cannot write {self._path}: {exc.strerror or exc}") \
                from exc
        return ACCEPTED

    async def reply(self, reply_to: Any, result: CommandResult) -> None:
        self._replies.append(result)
        del self._replies[:-100]

    async def close(self) -> None:
        self._worker.close(wait=False)  # a write stuck on a hung disk must not block the loop
