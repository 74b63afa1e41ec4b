"""structlog set-up: JSON lines when stdout is not a TTY (journald, Docker), colour on a TTY.

Every JSON line carries its syslog priority as `PRIORITY` (journald's field name: 3 error,
4 warning, 6 info, 7 debug). When stdout is the journal's stream (systemd sets JOURNAL_STREAM
to its device:inode), each line also starts with `<N>`, the prefix journald reads as the
priority (SyslogLevelPrefix=yes, its default), so `journalctl -p warning` filters.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# syslog(3) priorities, as journald stores them.
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6,
              "debug": 7, "notset": 7}


def add_priority(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: `PRIORITY` from the event's level (the method name)."""
    level = str(event.get("level", method)).lower()
    event["PRIORITY"] = PRIORITIES.get(level, 6)
    return event


def on_journal_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is the journald stream systemd connected (JOURNAL_STREAM=dev:ino)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class _PriorityPrefix:
    """Final processor: prefix the rendered line with `<N>` for journald."""

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        prio = event.get("PRIORITY", PRIORITIES.get(method, 6))
        line = self._renderer(logger, method, event)
        text = line.decode() if isinstance(line, bytes | bytearray) else str(line)
        return f"<{prio}>{text}"


def setup(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for the process. `fmt` is auto, json or console."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # every event reaches journald at once
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console
        else structlog.processors.JSONRenderer()
    )
    if on_journal_stream(sys.stdout):
        renderer = _PriorityPrefix(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *([] if use_console else [add_priority]),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([] if use_console else [structlog.processors.format_exc_info]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
