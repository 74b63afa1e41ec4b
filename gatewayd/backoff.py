"""Capped exponential backoff with full jitter, and a throttle for connection attempts."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable


class Backoff:
    """Delay n is uniform in [0, min(cap, base * 2**n)] (full jitter); `reset()` after success.

    `floor_s` keeps a minimum delay, so even the luckiest jitter is not a busy loop.
    """

    def __init__(self, base_s: float = 1.0, cap_s: float = 60.0, floor_s: float = 0.0,
                 rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.floor_s = floor_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt, growing with each call."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return max(self.floor_s, self._rng.uniform(0, ceiling))

    def cap_delay(self) -> float:
        """The delay after a permanent failure (auth): the full cap, jittered by up to 10%."""
        self.attempt += 1
        return self.cap_s * self._rng.uniform(0.9, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class Throttle:
    """Allows at most `count` events per sliding `window_s`; says how long to wait otherwise."""

    def __init__(self, count: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.window_s = window_s
        self._clock = clock
        self._events: deque[float] = deque()

    def wait_s(self) -> float:
        """Seconds to wait before the next event is allowed (0 if allowed now)."""
        now = self._clock()
        while self._events and now - self._events[0] >= self.window_s:
            self._events.popleft()
        if len(self._events) < self.count:
            return 0.0
        return self._events[0] + self.window_s - now

    def record(self) -> None:
        self._events.append(self._clock())
