"""Shared fixtures: a guard against leftover tasks and threads, and a real daemon runner."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd_sim.kit import PortHold

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
async def _no_leftover_tasks(_no_leftover_threads: None) -> Any:
    """Fail an async test that leaves asyncio tasks running."""
    yield
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in left:
        t.cancel()
    if left:
        await asyncio.gather(*left, return_exceptions=True)
    assert not left, f"test left tasks running: {[t.get_name() for t in left]}"
    # Join the loop's default-executor threads (asyncio.to_thread) so the thread guard sees
    # only threads a test really left behind.
    await asyncio.get_running_loop().shutdown_default_executor()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (torn down after the task guard)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    left = []
    for t in set(threading.enumerate()) - before:
        t.join(max(0.0, deadline - time.monotonic()))  # executor workers wind down on their own
        if t.is_alive():
            left.append(t.name)
    assert not left, f"test left threads running: {left}"


_port_holds: list[PortHold] = []


@pytest.fixture(autouse=True)
def _release_free_ports() -> Iterator[None]:
    yield
    for hold in _port_holds:
        hold.release()
    _port_holds.clear()


def free_port() -> int:
    """A free port for a server the test starts (often another process), held until the test
    ends (see PortHold): nothing polling it before the server listens can take it by connecting
    to itself. The server must set SO_REUSEADDR to listen on it, as every one here does."""
    hold, port = PortHold.any_port()
    _port_holds.append(hold)
    return port


class Daemon:
    """`gatewayd run` as a real subprocess, with its JSON log lines parsed."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._scan = 0  # events before this index were already matched or passed over
        self.events: list[dict[str, Any]] = []

    def start(self) -> Daemon:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "-c", str(self.config)],
                                     stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        out.close()
        return self

    def new_events(self) -> list[dict[str, Any]]:
        """Log events written since the last call (complete lines only)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "_raw", "text": line.decode(errors="replace")})
        self.events.extend(out)
        return out

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until a log event matches `predicate`; fail if the daemon dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.new_events()
            while self._scan < len(self.events):
                ev = self.events[self._scan]
                self._scan += 1
                if predicate(ev):
                    return ev
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.new_events()
                raise AssertionError(f"daemon exited with {self.proc.returncode}; log tail: "
                                     f"{self.events[-10:]}")
            time.sleep(0.02)  # polling a file for a log line; the predicate is the sync point
        raise AssertionError(f"timed out waiting for a log event; log tail: {self.events[-10:]}")

    def find(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Like `wait_for`, but also matches events already passed over."""
        for ev in self.events:
            if predicate(ev):
                return ev
        return self.wait_for(predicate, timeout)

    def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == name, timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.new_events()

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.new_events()
        return rc

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Collects daemons a test starts and kills any still running at the end."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.ensure_dead()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """The loop async tests run on: the one the daemon would pick (`[gateway] event_loop =
    "auto"`: uvloop where installed), or GATEWAYD_TEST_LOOP ("asyncio", "uvloop"). `make test`
    runs the suite on the daemon's loop and the loop-sensitive part again on asyncio's own."""
    from gatewayd.loop import choose

    name, factory = choose(os.environ.get("GATEWAYD_TEST_LOOP", "auto"))
    return {name: factory}
