"""The systemd notify protocol, written directly on $NOTIFY_SOCKET (a few lines, no dependency)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("gatewayd.notify")


class Notifier:
    """Sends READY=1, WATCHDOG=1, STOPPING=1, STATUS=... to systemd; a no-op outside systemd."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self._addr = addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1_000_000 if usec.isdigit() and mine else 0.0
        self._sock: socket.socket | None = None
        if addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError as exc:
            log.warning("sd_notify_failed", message=message, error=str(exc))

    async def watchdog_loop(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Ping WATCHDOG=1 at half the watchdog period while `alive()` holds."""
        if not self.watchdog_s or self._sock is None:
            return
        while True:
            if alive():
                self.notify("WATCHDOG=1")
            else:
                log.error("watchdog_withheld", reason="a core loop is not running")
            await asyncio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
