"""The `jsonl` uplink: appends delivered readings as JSON lines to a file, with rotation.

A local archive for users, and the simplest end-to-end check of the queue. Each line is
`{"seq", "device", "point", "value", "ts_ms", "quality", "backlog"}`.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from drivers.base import ByteSize, Command, CommandResult, Duration, Range
from gatewayd.backoff import Backoff
from gatewayd.errors import UplinkUnavailableError
from gatewayd.uplinks.base import Lease, Uplink, UplinkContext, UplinkState


@dataclass(frozen=True, slots=True)
class JsonlConfig:
    path: str  # relative paths are inside the state directory
    rotate_bytes: ByteSize = 64 * 1024**2  # rotate to .1, .2, ... past this size
    keep: Annotated[int, Range(0, 1000)] = 5  # rotated files kept
    batch: Annotated[int, Range(1, 100_000)] = 1000  # readings per write
    fsync: bool = False  # fsync each batch before acking (survives power loss)
    pause_file: str = ""  # while this file exists, delivery pauses and a backlog builds
    retry_max: Duration = 30.0
    linger: Duration = 1.0  # wait up to this for a full batch: fewer writes when data trickles


class JsonlUplink(Uplink):
    """Writes each leased batch, then acks it. A write error is retried with backoff."""

    Config = JsonlConfig

    def __init__(self, name: str, config: JsonlConfig, ctx: UplinkContext) -> None:
        super().__init__(name, config, ctx)
        p = Path(config.path)
        self.path = p if p.is_absolute() else ctx.state_dir / p
        self.replies: list[CommandResult] = []

    async def run(self) -> None:
        await self.connection_loop(self._session, Backoff(0.2, self.config.retry_max, floor_s=0.05))

    def _check_pause(self) -> None:
        if self.config.pause_file and os.path.exists(self.config.pause_file):
            raise UplinkUnavailableError(f"paused: {self.config.pause_file} exists")

    async def _session(self) -> None:
        await asyncio.to_thread(self._check_pause)
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        self.set_state(UplinkState.CONNECTED)
        await self.pump(self._send, self.config.batch, wait_s=1.0, linger_s=self.config.linger)

    async def _send(self, lease: Lease) -> None:
        lines = "".join(
            json.dumps({"seq": it.seq, "device": it.reading.device, "point": it.reading.point,
                        "value": it.reading.value, "ts_ms": it.reading.ts_ms,
                        "quality": it.reading.quality, "backlog": it.backlog},
                       separators=(",", ":")) + "\n"
            for it in lease.items)
        try:
            await asyncio.to_thread(self._write, lines.encode())
        except OSError as exc:
            raise UplinkUnavailableError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self.messages += 1

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

    async def reply(self, command: Command, result: CommandResult) -> None:
        self.replies.append(result)
        del self.replies[:-100]

    def status(self) -> dict[str, Any]:
        return {**super().status(), "path": str(self.path)}
