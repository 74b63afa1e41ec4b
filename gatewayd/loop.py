"""Which event loop the daemon runs on: uvloop where it is installed, else asyncio's own.

At the bench's default load (20 Modbus units polled each second, one EnOS uplink) most of
the daemon's CPU goes to the event loop's own stepping. uvloop (libuv, in C) steps it for
about a fifth less CPU, and nothing else changes: the daemon uses only the loop's public
API (readers on file descriptors, timers, sockets, signals, call_soon_threadsafe), and the
test suite passes on both loops.

`[gateway] event_loop`:
- "auto" (default): uvloop if it imports, else asyncio. pip installs uvloop with gatewayd on
  Linux x86_64 and aarch64, where PyPI has its wheels; elsewhere (a 32-bit Raspberry Pi OS)
  `pip install uvloop` adds it (piwheels has it), or the daemon runs on asyncio.
- "uvloop": uvloop or a config error, never a silent fallback.
- "asyncio": the standard library's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
CHOICES = ("auto", "uvloop", "asyncio")


class LoopUnavailableError(Exception):
    """The configured event loop cannot be had here (a config problem: the message says why)."""


def choose(setting: str) -> tuple[str, LoopFactory]:
    """(name, factory) of the loop that `setting` asks for; LoopUnavailableError if it cannot."""
    if setting not in CHOICES:
        raise LoopUnavailableError(f"[gateway] event_loop: expected one of {', '.join(CHOICES)}, "
                                   f"got {setting!r}")
    if setting == "asyncio":
        return "asyncio", asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        if setting == "uvloop":
            raise LoopUnavailableError(
                f"[gateway] event_loop = \"uvloop\", but uvloop cannot be imported ({exc}): "
                f"install it (pip install uvloop) or set event_loop = \"auto\"") from None
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio" (or the class of another loop) for a running loop."""
    module = type(loop).__module__
    return "uvloop" if module.startswith("uvloop") else (
        "asyncio" if module.startswith("asyncio") else f"{module}.{type(loop).__qualname__}")
