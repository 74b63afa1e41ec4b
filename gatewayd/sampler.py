"""One sampling loop per device: interval with jitter, timeout per read, backoff on faults.

A device's fault only ever slows its own loop: each loop handles DriverError and timeouts
itself, so one broken sensor never delays another.

Every device has a slot every interval. A poll that comes due while the previous one is still
running (a slow read, or a wait for a shared port) is made as soon as that one ends (when the
loop itself is behind, CPU-bound, at the next slot). Slots that pass entirely are missed,
counted (`gatewayd_device_missed_polls_total`) and never made up in a burst. The loop books
them when the poll that overran them ends; until then a scrape or /status adds the ones already
certain (`DeviceState.missed_pending`), so the count is current, not up to two slots behind.
Devices on one serial port queue for it in order (its lock is FIFO), so an over-subscribed port
gives each of them the same share of the polls it can make, and `PortLoads` says which port
cannot keep up and what rate it sustains.

Polls are on a shared tick grid (a tenth of the interval, at most 100 ms): devices due on
the same tick wake together and their readings land in one commit. `jitter` (default 0) moves
each poll by up to +/- that fraction of the interval, at random: a reason to set it is a
signal that could alias with a strictly periodic sampler. It costs wake-ups: a 5 % jitter on
1 s devices spreads them over two or three ticks a second, and at 20 devices the idle daemon
made 39 wake-ups/s and used 0.56 % of a core against 22/s and 0.31 % without it.

A poll is under way for the queue (`poll_started` .. `poll_ended`) from the read's start (its
wait for the port included) to the submit of its readings, or its failure or cancel: the group
commit waits for polls under way (within `commit_window`), so a burst commits once.
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
    missed_polls: int = 0  # slots that passed without a poll (the device or its port was busy)
    configured_hz: float = 0.0  # 1 / interval
    achieved_hz: float | None = None  # polls per second over the last rate window
    port: str | None = None  # the serial port it shares, if any
    opened: asyncio.Event | None = None  # set after the first open attempt (ready signal)
    # The slot (time.monotonic()) the running loop is polling, or waiting for; None when it is
    # not running. With it the missed slots are known as they pass, not only when the poll
    # that overran them ends.
    slot: float | None = None
    interval_s: float = 0.0

    def missed_pending(self, now: float | None = None) -> int:
        """Slots already missed that the loop has not yet counted: a poll (or back-off) for
        `slot` that is still under way has let every later slot but the latest pass, and the
        loop counts at least those when it ends (it then polls the latest due slot at once, or,
        after a quick read, skips it too). So `missed_polls + missed_pending()` only grows and
        is what has been missed by now, where `missed_polls` lags by up to two slots while a
        port is over-subscribed."""
        if self.slot is None or self.interval_s <= 0:
            return 0
        now = time.monotonic() if now is None else now
        # the loop's own arithmetic (`next_at = slot + interval`), so never more than it counts
        return max(0, int((now - (self.slot + self.interval_s)) // self.interval_s))

    def missed_now(self, now: float | None = None) -> int:
        """Slots missed by now: counted plus pending."""
        return self.missed_polls + self.missed_pending(now)

    def as_dict(self, stats: dict[str, int] | None = None) -> dict[str, Any]:
        return {"driver": self.driver, "state": self.state, "since": round(self.since, 3),
                "last_error": self.last_error, "reads": self.reads, "failures": self.failures,
                "last_read": round(self.last_read_ms / 1000, 3) if self.last_read_ms else None,
                "missed_polls": self.missed_now(),
                "polls_per_s": {"configured": round(self.configured_hz, 3),
                                "achieved": None if self.achieved_hz is None
                                else round(self.achieved_hz, 3)},
                "port": self.port, "stats": stats or {}}


class _Rate:
    """Events per second over the last completed window (until then, since the start)."""

    __slots__ = ("_n", "_n0", "_t0", "hz", "window_s")

    def __init__(self, window_s: float, now: float) -> None:
        self.window_s = window_s
        self._t0 = now
        self._n0 = self._n = 0
        self.hz: float | None = None

    def add(self, now: float, n: int = 1) -> bool:
        """Count `n` events; True when a window just completed (and `hz` was updated)."""
        self._n += n
        elapsed = now - self._t0
        if elapsed >= self.window_s:
            self.hz = (self._n - self._n0) / elapsed
            self._t0, self._n0 = now, self._n
            return True
        if self._n0 == 0:  # no window completed yet: an estimate since the start
            self.hz = self._n / max(elapsed, self.window_s / 10)
        return False


class PortLoad:
    """The polls the devices of one serial port ask for and get."""

    WARN_EVERY_S = 600.0

    def __init__(self, port: str, window_s: float = 10.0) -> None:
        self.port = port
        self.devices: dict[str, float] = {}  # device -> configured polls/s
        self.polls = 0
        self.missed = 0
        self._window_s = window_s
        self._rate: _Rate | None = None
        self._missed_at_window = 0
        self._polls_at_window = 0
        self.over_subscribed = False
        self.sustained_hz: float | None = None  # the rate it made while over-subscribed
        self._warned_at = -math.inf

    @property
    def configured_hz(self) -> float:
        return sum(self.devices.values())

    def add(self, device: str, interval_s: float) -> None:
        self.devices[device] = 1.0 / interval_s
        self._window_s = max(self._window_s, 5 * interval_s)

    def note(self, now: float, polls: int, missed: int) -> None:
        """`polls` polls made and `missed` slots missed by one of the port's devices."""
        self.polls += polls
        self.missed += missed
        if self._rate is None:
            self._rate = _Rate(self._window_s, now)
        if not self._rate.add(now, polls):
            return
        polls = self.polls - self._polls_at_window
        missed_now = self.missed - self._missed_at_window
        self._polls_at_window, self._missed_at_window = self.polls, self.missed
        # Over-subscribed: more than 1 % of the slots in the window were missed.
        self.over_subscribed = missed_now > 0.01 * (polls + missed_now)
        if not self.over_subscribed:
            return
        self.sustained_hz = self._rate.hz
        if now - self._warned_at >= self.WARN_EVERY_S:
            self._warned_at = now
            log.warning("serial_port_oversubscribed", port=self.port,
                        devices=len(self.devices),
                        configured_polls_per_s=round(self.configured_hz, 1),
                        sustained_polls_per_s=round(self._rate.hz or 0.0, 1),
                        missed_in_window=missed_now,
                        hint="lengthen the devices' intervals or move some to another port; "
                             "a unit that does not answer holds the line for its timeouts")

    def as_dict(self) -> dict[str, Any]:
        hz = self._rate.hz if self._rate is not None else None
        return {"devices": len(self.devices),
                "polls_per_s": {"configured": round(self.configured_hz, 3),
                                "achieved": None if hz is None else round(hz, 3)},
                "polls": self.polls, "missed_polls": self.missed,
                "over_subscribed": self.over_subscribed,
                "sustained_polls_per_s": None if self.sustained_hz is None
                else round(self.sustained_hz, 1)}


class PortLoads:
    """One `PortLoad` per serial port that sampled devices share (for /status)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.ports: dict[str, PortLoad] = {}
        self.window_s = window_s  # shortest rate window (longer for slow devices)

    def get(self, port: str) -> PortLoad:
        load = self.ports.get(port)
        if load is None:
            load = self.ports[port] = PortLoad(port, self.window_s)
        return load

    def status(self) -> dict[str, Any]:
        return {name: p.as_dict() for name, p in self.ports.items()}


def device_port(driver: Driver) -> str | None:
    """The serial port a driver's config names (serial and Modbus drivers), else None."""
    port = getattr(getattr(driver, "config", None), "port", None)
    return port if isinstance(port, str) and port else None


def _nothing() -> None:
    pass


class Sampler:
    """Runs one device: open, then read every interval and submit readings to the queue."""

    def __init__(self, driver: Driver, interval_s: float, timeout_s: float, jitter: float,
                 backoff_max_s: float, queue: Any, metrics: Any = None,
                 rng: random.Random | None = None,
                 on_state: Callable[[str, bool, str, int], None] | None = None,
                 ports: PortLoads | None = None) -> None:
        self.driver = driver
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.jitter = jitter
        self.queue = queue
        self.on_state = on_state  # (device, failing, error, ts_ms) on ok <-> failing changes
        self.rng = rng or random.Random()
        self.backoff = Backoff(base_s=min(1.0, interval_s), cap_s=max(backoff_max_s, interval_s),
                               floor_s=min(0.1, interval_s), rng=self.rng)
        port = device_port(driver)
        self.status = DeviceState(driver.name, type(driver).__name__, since=time.time(),
                                  configured_hz=1.0 / interval_s, interval_s=interval_s, port=port,
                                  opened=asyncio.Event())
        self.port_load: PortLoad | None = None
        if ports is not None and port is not None:
            self.port_load = ports.get(port)
            self.port_load.add(driver.name, interval_s)
        self._rate = _Rate(max(10.0, 5 * interval_s), time.monotonic())
        # Metric children looked up once: a 1 Hz loop should cost microseconds, not a dict walk.
        # Created here, so every device's counters exist (at 0) from the start.
        self._m_sampled = metrics.readings_sampled.labels(driver.name) if metrics else None
        self._m_failures = metrics.device_failures.labels(driver.name) if metrics else None
        self._m_ok = metrics.device_ok.labels(driver.name) if metrics else None
        self._m_missed = metrics.device_missed_polls.labels(driver.name) if metrics else None
        if self._m_missed is not None:  # slots missed while a poll is still under way
            self._m_missed.pending = self.status.missed_pending
        # The queue's group commit waits for polls under way (a burst on a shared line commits
        # once); a queue without the hooks (a test's sink) is fine.
        self._poll_started: Callable[[], None] = getattr(queue, "poll_started", _nothing)
        self._poll_ended: Callable[[], None] = getattr(queue, "poll_ended", _nothing)

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
        try:
            await self._run()
        finally:
            # Stopped (a reload, the shutdown): the slots that already passed without a poll
            # are counted now, so the counter never steps back from what a scrape showed.
            st = self.status
            pending = st.missed_pending()
            st.slot = None
            if pending:
                self._missed(pending, time.monotonic(), port_busy=False)

    async def _run(self) -> None:
        st = self.status
        interval = self.interval_s
        spread = interval * self.jitter
        need_open = True
        # The first poll is made at once; with a jitter the slots start at a random offset in
        # the first interval (within the jitter), without one on the grid's next tick.
        next_at = time.monotonic() + self.rng.uniform(0, interval * self.jitter * 2)
        st.slot = next_at
        while True:
            # `next_at` is the slot being polled now.
            in_poll = False  # between poll_started and poll_ended (the queue waits for it)
            try:
                if need_open:
                    try:
                        await self._open()
                    finally:
                        assert st.opened is not None
                        st.opened.set()
                    need_open = False
                started = time.monotonic()
                self._poll_started()
                in_poll = True
                async with asyncio.timeout(self.timeout_s):
                    readings = await self.driver.read()
                took = time.monotonic() - started
            except (DriverError, TimeoutError) as exc:
                if in_poll:
                    self._poll_ended()
                self._polled()
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
                # Back off: the slots it sleeps through are missed, as any others (but they
                # say nothing of the port's load).
                await asyncio.sleep(self.backoff.next_delay())
                backed_off, took = True, 0.0
            except BaseException:  # cancelled (stop, reload) or a driver's bug: not under way
                if in_poll:
                    self._poll_ended()
                raise
            else:
                backed_off = False
                committed = None
                try:
                    self._polled()
                    self.backoff.reset()
                    st.reads += 1
                    st.consecutive_failures = 0
                    st.last_read_ms = readings[-1].ts_ms if readings else st.last_read_ms
                    self._set("ok")
                    if readings:
                        committed = self.queue.submit(readings)
                        if self._m_sampled is not None:
                            self._m_sampled.inc(len(readings))
                finally:
                    self._poll_ended()
                if committed is not None and self.queue.backpressure():
                    await committed  # the disk is behind: sample slower rather than hoard memory
            next_at += interval
            st.slot = next_at
            now = time.monotonic()
            if next_at <= now:
                # Late. After a read that took an interval or more (a slow device, a wait for
                # a shared port) the latest slot that came due is polled at once: devices of an
                # over-subscribed port stay in its queue and get equal turns. Otherwise the
                # loop itself is behind (CPU): wait for the next slot and leave it room.
                # After a back-off the due slot is tried at once. The slots that passed are
                # missed; never a burst.
                missed = int((now - next_at) // interval)
                if not backed_off and took < interval:
                    missed += 1
                if missed:
                    next_at += missed * interval
                    st.slot = next_at
                    self._missed(missed, now, port_busy=not backed_off)
                if next_at <= now:
                    await asyncio.sleep(0)
                    continue
            await asyncio.sleep(self._until_tick(next_at + self.rng.uniform(-spread, spread), now))

    def _polled(self) -> None:
        """Account one poll, made now."""
        now = time.monotonic()
        self._rate.add(now)
        self.status.achieved_hz = self._rate.hz
        if self.port_load is not None:
            self.port_load.note(now, 1, 0)

    def _missed(self, missed: int, now: float, port_busy: bool = True) -> None:
        """Account `missed` slots that passed without a poll (`port_busy`: not a back-off)."""
        self.status.missed_polls += missed
        if self._m_missed is not None:
            self._m_missed.inc(missed)
        if self.port_load is not None:
            self.port_load.note(now, 0, missed if port_busy else 0)

    def _until_tick(self, target: float, now: float) -> float:
        """Seconds to sleep until `target` rounded up to the shared tick grid.

        Devices (and the queue's commit timer) then wake in the same loop iteration instead of
        one wake-up each: on a Pi most idle CPU is wake-ups, not work. The grid is a tenth of
        the interval, at most 100 ms: a device's polls stay one interval apart (the interval is a
        whole number of ticks up to 10 s), shifted by less than a tick.
        """
        tick = min(0.1, self.interval_s / 10)
        return max(0.0, math.ceil(target / tick) * tick - now)
