"""A log that says a repeated warning once per interval, with the count of repeats it held back.

For warnings that hostile or broken input can repeat without end (malformed pushes, refused
readings): the first is logged at once, the rest at most once per `every_s` per key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """`warning(event, key=..., **fields)`: at most one line per (event, key) per `every_s`."""

    def __init__(self, logger: Any, every_s: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self.max_keys = max_keys
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, event: str, key: str = "", **fields: Any) -> bool:
        """Log unless the same (event, key) was logged within `every_s`; True if logged."""
        k = f"{event}\0{key}"
        now = self.clock()
        if now - self._last.get(k, -math.inf) < self.every_s:
            self._held[k] = self._held.get(k, 0) + 1
            return False
        if len(self._last) >= self.max_keys and k not in self._last:
            self._last = {kk: t for kk, t in self._last.items() if now - t < self.every_s}
            if len(self._last) >= self.max_keys:  # a key per message: fall back to one per event
                k = f"{event}\0*"
                if now - self._last.get(k, -math.inf) < self.every_s:
                    self._held[k] = self._held.get(k, 0) + 1
                    return False
        self._last[k] = now
        self.logger.warning(event, repeats_held_back=self._held.pop(k, 0), **fields)
        return True
