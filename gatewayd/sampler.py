"""One sampling loop per device: interval with jitter, timeout per read, backoff on faults.

A device's fault only ever slows its own loop: each loop handles DriverError and timeouts
itself, so one broken sensor never delays another.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from drivers.base import DeviceNotFoundError, Driver, DriverError
from gatewayd.backoff import Backoff

log = structlog.get_logger("gatewayd.sampler")


@dataclass
class DeviceState:
    """What /status shows of a device."""

    name: str
    driver: str
    state: str = "starting"  # starting, ok, failing
    since: float = 0.0
    last_error: str = ""
    reads: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_read_ms: int = 0
    opened: asyncio.Event | None = None  # set after the first open attempt (ready signal)

    def as_dict(self, stats: dict[str, int] | None = None) -> dict[str, Any]:
        return {"driver": self.driver, "state": self.state, "since": round(self.since, 3),
                "last_error": self.last_error, "reads": self.reads, "failures": self.failures,
                "last_read": round(self.last_read_ms / 1000, 3) if self.last_read_ms else None,
                "stats": stats or {}}


class Sampler:
    """Runs one device: open, then read every interval and submit readings to the queue."""

    def __init__(self, driver: Driver, interval_s: float, timeout_s: float, jitter: float,
                 backoff_max_s: float, queue: Any, metrics: Any = None,
                 rng: random.Random | None = None,
                 on_state: Callable[[str, bool, str, int], None] | None = None) -> None:
        self.driver = driver
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.jitter = jitter
        self.queue = queue
        self.on_state = on_state  # (device, failing, error, ts_ms) on ok <-> failing changes
        self.rng = rng or random.Random()
        self.backoff = Backoff(base_s=min(1.0, interval_s), cap_s=max(backoff_max_s, interval_s),
                               floor_s=min(0.1, interval_s), rng=self.rng)
        self.status = DeviceState(driver.name, type(driver).__name__, since=time.time(),
                                  opened=asyncio.Event())
        # Metric children looked up once: a 1 Hz loop should cost microseconds, not a dict walk.
        self._m_sampled = metrics.readings_sampled.labels(driver.name) if metrics else None
        self._m_failures = metrics.device_failures.labels(driver.name) if metrics else None
        self._m_ok = metrics.device_ok.labels(driver.name) if metrics else None

    def _set(self, state: str, error: str = "") -> None:
        st = self.status
        if error:
            st.last_error = error
        if state == st.state:
            return
        st.since = time.time()
        changed = state == "failing" or st.state == "failing"
        if state == "failing":
            log.warning("device_failing", device=st.name, error=error)
        elif st.state == "failing":
            log.info("device_recovered", device=st.name, failures=st.consecutive_failures)
        st.state = state
        if changed and self.on_state is not None:
            self.on_state(st.name, state == "failing", st.last_error if state == "failing" else "",
                          int(st.since * 1000))
        if self._m_ok is not None:
            self._m_ok.set(1 if state == "ok" else 0)

    async def _open(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self.driver.open()

    async def run(self) -> None:
        """Sample until cancelled."""
        st = self.status
        need_open = True
        # Start at a random offset in the first interval, so devices do not all fire at once.
        next_at = time.monotonic() + self.rng.uniform(0, self.interval_s * self.jitter * 2)
        while True:
            try:
                if need_open:
                    try:
                        await self._open()
                    finally:
                        assert st.opened is not None
                        st.opened.set()
                    need_open = False
                async with asyncio.timeout(self.timeout_s):
                    readings = await self.driver.read()
            except (DriverError, TimeoutError) as exc:
                error = (f"read timed out after {self.timeout_s:g}s" if isinstance(exc, TimeoutError)
                         else str(exc))
                st.failures += 1
                st.consecutive_failures += 1
                if isinstance(exc, DeviceNotFoundError):
                    need_open = True
                if self._m_failures is not None:
                    self._m_failures.inc()
                if st.state == "failing":
                    log.debug("device_read_failed", device=st.name, error=error)
                self._set("failing", error)
                delay = self.backoff.next_delay()
                await asyncio.sleep(delay)
                next_at = time.monotonic()
                continue
            self.backoff.reset()
            st.reads += 1
            st.consecutive_failures = 0
            st.last_read_ms = readings[-1].ts_ms if readings else st.last_read_ms
            self._set("ok")
            if readings:
                committed = self.queue.submit(readings)
                if self._m_sampled is not None:
                    self._m_sampled.inc(len(readings))
                if self.queue.backpressure():
                    await committed  # the disk is behind: sample slower rather than hoard memory
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # fell behind (slow read): skip missed slots, no burst
                next_at = now + self.interval_s - ((now - next_at) % self.interval_s)
            spread = self.interval_s * self.jitter
            await asyncio.sleep(self._until_tick(next_at + self.rng.uniform(-spread, spread), now))

    def _until_tick(self, target: float, now: float) -> float:
        """Seconds to sleep until `target` rounded up to the shared tick grid.

        Devices (and the queue's commit timer) then wake in the same loop iteration instead of
        one wake-up each: on a Pi most idle CPU is wake-ups, not work. The grid is a tenth of
        the interval, at most 100 ms, so timing stays within the configured jitter.
        """
        tick = min(0.1, self.interval_s / 10)
        return max(0.0, math.ceil(target / tick) * tick - now)
