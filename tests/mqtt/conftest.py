"""A real mosquitto per test (Debian's /usr/sbin/mosquitto) on a free port, with its own config."""

from __future__ import annotations

import asyncio
import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gatewayd_sim.kit import PortHold

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto:
    """One broker process; `stop()`/`start()` for outages, `users` for password auth."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None,
                 tls: tuple[Path, Path, Path] | None = None, persist: bool = False) -> None:
        self.dir = workdir
        # The port stays reserved whenever the broker is down (see PortHold): a client retrying
        # it could otherwise connect to itself and keep it, and the broker could not come back.
        self._hold, self.port = PortHold.any_port()
        self.users = users or {}
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        persistence = f"persistence true\npersistence_location {workdir}/" if persist else \
            "persistence false"
        lines = [f"listener {self.port} 127.0.0.1", persistence, "log_dest stderr",
                 "log_type error", "log_type warning", "max_inflight_messages 0",
                 "max_queued_messages 100000",
                 f"user {getpass.getuser()}"]  # as root it would switch to "mosquitto"
        if self.users:
            pw = workdir / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True,
                           timeout=30)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if tls is not None:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:  # wait for the listener (a failure bound, not a sync sleep)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                self._hold.release()  # mosquitto has it now
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"mosquitto did not start: {err}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        if self.proc is not None:
            self._hold.hold(self.port)  # if it fails, start() says why mosquitto cannot listen
        self.proc = None

    def client(self, **kw: Any) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", self.port, **kw)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path)
    m.start()
    yield m
    m.stop()


class Watcher:
    """A subscriber that records every message on `topic` (a plain aiomqtt client)."""

    def __init__(self, broker: Mosquitto, topic: str, client_id: str = "", **auth: Any) -> None:
        """With `client_id`, a persistent session: the broker keeps what arrives while away."""
        self.broker, self.topic, self.client_id, self.auth = broker, topic, client_id, auth
        self.messages: list[tuple[str, bytes]] = []
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run(), name="test-mqtt-watcher")
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def _run(self) -> None:
        kw: dict[str, Any] = {"identifier": self.client_id, "clean_session": False} \
            if self.client_id else {}
        kw.update(self.auth)
        async with self.broker.client(**kw) as c:
            await c.subscribe(self.topic, qos=1)
            self._ready.set()
            async for msg in c.messages:
                self.messages.append((str(msg.topic), bytes(msg.payload)))  # type: ignore[arg-type]
                self.changed.set()

    async def wait(self, pred: Any, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not pred(self.messages):
                self.changed.clear()
                await self.changed.wait()

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture(autouse=True)
async def _own_executor() -> AsyncIterator[None]:
    """aiomqtt connects in the loop's default executor: give each test one it can end."""
    from concurrent.futures import ThreadPoolExecutor
    executor = ThreadPoolExecutor(2, thread_name_prefix="mqtt-test-executor")
    asyncio.get_running_loop().set_default_executor(executor)
    yield
    executor.shutdown(wait=False)
