"""Samplers: one broken or hung device never delays another, and a failing one recovers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from structlog.testing import capture_logs

from drivers.base import Driver, DriverError, Reading, now_ms
from drivers.wave import WaveConfig, WaveDriver, WavePoint
from gatewayd.queue import Queue, QueueConfig
from gatewayd.sampler import Sampler


class Flaky(Driver):
    """Fails while `broken` is set; hangs while `hang` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name, None, None)  # type: ignore[arg-type]
        self.broken = False
        self.hang = False

    async def read(self) -> list[Reading]:
        if self.hang:
            await asyncio.Event().wait()
        if self.broken:
            raise DriverError(self.name, "NACK at 0x76")
        return [Reading(self.name, "x", 1.0, now_ms())]


async def until(pred, limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not pred():
            await asyncio.sleep(0.005)  # polling a condition, bounded by the timeout


async def test_broken_and_hung_devices_do_not_slow_a_good_one(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q.db", QueueConfig(commit_window=0.01), ["a"])
    await q.open()
    good = Sampler(WaveDriver("good", WaveConfig(), None), 0.01, 1.0, 0.0, 5.0, q)  # type: ignore[arg-type]
    hung_driver, broken_driver = Flaky("hung"), Flaky("broken")
    hung_driver.hang = True
    broken_driver.broken = True
    hung = Sampler(hung_driver, 0.01, 0.05, 0.0, 5.0, q)
    changes: list[tuple[str, bool, str]] = []
    broken = Sampler(broken_driver, 0.01, 1.0, 0.0, 5.0, q,
                     on_state=lambda dev, failing, err, ts: changes.append((dev, failing, err)))
    tasks = [asyncio.create_task(s.run(), name=s.driver.name) for s in (good, hung, broken)]
    qtask = asyncio.create_task(q.run())
    try:
        t0 = time.monotonic()
        await until(lambda: good.status.reads >= 50)
        elapsed = time.monotonic() - t0
        # 50 reads at 10 ms nominal take 0.5 s; a shared-loop stall would take far longer.
        assert elapsed < 2.5, f"good device slowed down: 50 reads took {elapsed:.2f}s"
        assert hung.status.state == "failing" and "timed out after 0.05s" in hung.status.last_error
        assert broken.status.state == "failing" and "NACK at 0x76" in broken.status.last_error
        assert good.status.state == "ok" and good.status.failures == 0
        with capture_logs() as logs:
            broken_driver.broken = False
            hung_driver.hang = False
            await until(lambda: broken.status.state == "ok" and hung.status.state == "ok")
        assert {e["device"] for e in logs if e["event"] == "device_recovered"} == {"broken", "hung"}
        # The uplinks' health feed saw exactly one failing and one recovered transition.
        assert changes == [("broken", True, "broken: NACK at 0x76"), ("broken", False, "")]
    finally:
        for t in [*tasks, qtask]:
            t.cancel()
        await asyncio.gather(*tasks, qtask, return_exceptions=True)
        await q.close()


async def test_backoff_grows_and_resets() -> None:
    from gatewayd.backoff import Backoff, Throttle

    b = Backoff(base_s=1, cap_s=8)
    ceilings = []
    for _ in range(6):
        ceilings.append(min(8, 1 * 2 ** b.attempt))
        assert b.next_delay() <= ceilings[-1]
    assert ceilings == [1, 2, 4, 8, 8, 8]
    assert 7.2 <= b.cap_delay() <= 8
    b.reset()
    assert b.attempt == 0
    clock = [0.0]
    t = Throttle(4, 120, clock=lambda: clock[0])
    for _ in range(4):
        assert t.wait_s() == 0
        t.record()
    assert t.wait_s() == 120
    clock[0] = 121
    assert t.wait_s() == 0


def test_wave_shapes_are_deterministic() -> None:
    cfg = WaveConfig(points={"s": WavePoint("sine", 0, 10, 4.0), "r": WavePoint("ramp", 0, 10, 10.0),
                             "w": WavePoint("walk", 0, 10, step=1, seed=5)})
    d1, d2 = WaveDriver("a", cfg, None), WaveDriver("b", cfg, None)  # type: ignore[arg-type]
    assert d1.value_at("s", 1.0) == 10.0 and d1.value_at("s", 3.0) == 0.0
    assert d1.value_at("r", 2.5) == 2.5
    walk1 = [d1.value_at("w", 0) for _ in range(20)]
    walk2 = [d2.value_at("w", 0) for _ in range(20)]
    assert walk1 == walk2 and len(set(walk1)) > 10
    assert all(0 <= v <= 10 for v in walk1)


def test_wake_ups_share_a_tick_grid() -> None:
    """Devices wake on a shared grid (a tenth of the interval, at most 100 ms), never early."""
    s1 = Sampler(WaveDriver("a", WaveConfig(), None), 1.0, 1.0, 0.05, 5.0, None)  # type: ignore[arg-type]
    s2 = Sampler(WaveDriver("b", WaveConfig(), None), 0.05, 1.0, 0.05, 5.0, None)  # type: ignore[arg-type]
    now = 1000.0
    for target in (1000.01, 1000.049, 1000.1, 1000.55, 1001.0001):
        wake = now + s1._until_tick(target, now)
        assert wake >= target - 1e-9 and wake - target < 0.1 + 1e-9
        assert abs(wake * 10 - round(wake * 10)) < 1e-6  # on the 100 ms grid
    # Two devices whose deadlines fall in the same tick wake together.
    assert s1._until_tick(1000.31, now) == s1._until_tick(1000.39, now)
    fast = now + s2._until_tick(1000.0123, now)  # 50 ms interval: a 5 ms grid
    assert abs(fast * 200 - round(fast * 200)) < 1e-6 and fast - 1000.0123 < 0.005 + 1e-9
    assert s1._until_tick(999.0, now) == 0.0  # a deadline in the past: no sleep


class _PortDevice(Driver):
    """A device on a shared port: each read holds the port's FIFO lock for `work_s`."""

    @dataclass
    class Config:
        port: str

    def __init__(self, name: str, lock: asyncio.Lock, work_s: float) -> None:
        super().__init__(name, self.Config("/dev/ttyTEST0"), None)  # type: ignore[arg-type]
        self.lock = lock
        self.work_s = work_s
        self.reads = 0
        self.first = self.last = 0.0  # when the first read started, the last one ended

    async def read(self) -> list[Reading]:
        self.first = self.first or time.monotonic()
        async with self.lock:
            await asyncio.sleep(self.work_s)
            self.reads += 1
        self.last = time.monotonic()
        return [Reading(self.name, "x", 1.0, now_ms())]


class _Sink:
    def submit(self, readings: list[Reading]) -> None:
        pass

    def backpressure(self) -> bool:
        return False


async def test_overloaded_port_serves_devices_evenly_counts_missed_and_warns_once() -> None:
    """Five devices at 100 Hz on a port that makes at most ~200 polls/s: each gets the same
    share, every slot is either polled or counted missed, and one warning names the port."""
    from prometheus_client import generate_latest

    from gatewayd.metrics import Metrics
    from gatewayd.sampler import PortLoads

    metrics = Metrics()
    ports = PortLoads(window_s=0.3)
    lock = asyncio.Lock()
    devices = [_PortDevice(f"d{i}", lock, 0.005) for i in range(5)]
    samplers = [Sampler(d, 0.01, 1.0, 0.0, 1.0, _Sink(), metrics, ports=ports) for d in devices]
    text = generate_latest(metrics.registry).decode()
    for d in devices:  # every device's counter exists, at 0, before the first poll
        assert f'gatewayd_device_missed_polls_total{{device="{d.name}"}} 0.0' in text
    with capture_logs() as logs:
        tasks = [asyncio.create_task(s.run()) for s in samplers]
        try:
            await until(lambda: sum(d.reads for d in devices) >= 300, 60)
        finally:
            stopped = time.monotonic()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    reads = [d.reads for d in devices]
    assert max(reads) - min(reads) <= 1, reads  # turns in order: equal shares
    for d, s in zip(devices, samplers, strict=True):
        st = s.status
        # every slot up to the stop was polled or missed (the stop books the ones that passed
        # under the poll it cut), but the one it cut and the latest due
        slots = (stopped - d.first) / 0.01
        assert slots - 2.01 <= st.reads + st.missed_polls <= slots + 1.01, (st.reads, st.missed_polls, slots)
        assert st.missed_polls > st.reads  # demand 500/s, supply under 200/s
        counted = metrics.device_missed_polls.labels(st.name)._value.get()
        assert counted == st.missed_polls
        rates = st.as_dict()["polls_per_s"]
        assert rates["configured"] == 100.0 and 0 < rates["achieved"] <= 1 / 0.005 / 5 + 1
    status = ports.status()["/dev/ttyTEST0"]
    assert status["devices"] == 5 and status["polls_per_s"]["configured"] == 500.0
    assert status["over_subscribed"] is True
    assert 0 < status["sustained_polls_per_s"] <= 1 / 0.005 + 1
    warnings = [e for e in logs if e["event"] == "serial_port_oversubscribed"]
    assert len(warnings) == 1  # rate-limited: once per port, however many windows
    assert warnings[0]["port"] == "/dev/ttyTEST0" and warnings[0]["configured_polls_per_s"] == 500.0
    assert 0 < warnings[0]["sustained_polls_per_s"] <= 201


async def test_a_slow_read_misses_the_slots_it_overran_and_polls_once_after() -> None:
    """A read that overruns several slots is followed by one poll at once (no burst), and the
    slots it overran are counted as missed."""
    gate = asyncio.Event()
    entered = asyncio.Event()
    times: list[float] = []

    class Slow(Driver):
        async def read(self) -> list[Reading]:
            times.append(time.monotonic())
            if len(times) == 2:
                entered.set()
                await gate.wait()
                times.append(time.monotonic())
            return [Reading(self.name, "x", 1.0, now_ms())]

    s = Sampler(Slow("slow", None, None), 0.02, 30.0, 0.0, 1.0, _Sink())  # type: ignore[arg-type]
    task = asyncio.create_task(s.run())
    try:
        await entered.wait()
        # hold the read until at least five slots passed (measured, not slept for exactly)
        await until(lambda: time.monotonic() - times[1] >= 0.1)
        gate.set()
        await until(lambda: len(times) >= 8)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    held = times[2] - times[1]
    overran = held / 0.02
    assert overran - 2 <= s.status.missed_polls <= overran + 1, (held, s.status.missed_polls)
    # No burst: after the release, at most one poll per slot that came due (plus the due one),
    # not the missed ones made up.
    after = (times[-1] - times[2]) / 0.02
    assert len(times) - 3 <= after + 2, (len(times), after)


def _scraped_missed(metrics) -> dict[str, float]:
    """gatewayd_device_missed_polls_total by device, from the real exposition text."""
    import re

    from gatewayd.metrics import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {d: float(v) for d, v in
            re.findall(r'^gatewayd_device_missed_polls_total\{device="([^"]+)"\} (\S+)$', text, re.M)}


async def test_slots_missed_under_a_held_poll_show_at_once_and_are_booked_on_stop() -> None:
    """While a read overruns slots, the metric and /status already count the ones that passed
    (not only after the read ends), and stopping the device books them, so the counter a
    scrape showed never steps back."""
    from gatewayd.metrics import Metrics

    metrics = Metrics()
    gate = asyncio.Event()
    holding = asyncio.Event()
    hold_next = [False]
    reads = [0]

    class Held(Driver):
        async def read(self) -> list[Reading]:
            reads[0] += 1
            if hold_next[0]:
                hold_next[0] = False
                holding.set()
                await gate.wait()
            return [Reading(self.name, "x", 1.0, now_ms())]

    async def hold_ten_slots() -> float:
        """Hold the next read until ten of its slots passed; the scraped count then."""
        gate.clear()
        holding.clear()
        hold_next[0] = True
        await holding.wait()
        slot = s.status.slot
        assert slot is not None
        await until(lambda: time.monotonic() - slot >= 0.2)  # measured, not slept for
        return _scraped_missed(metrics)["held"]

    s = Sampler(Held("held", None, None), 0.02, 30.0, 0.0, 1.0, _Sink(), metrics)  # type: ignore[arg-type]
    task = asyncio.create_task(s.run())
    try:
        await until(lambda: reads[0] >= 2)
        seen = await hold_ten_slots()
        assert s.status.missed_polls == 0  # the loop books them when the read ends
        assert 8 <= seen <= 10, seen  # the latest due slot may still be polled: not counted
        assert s.status.as_dict()["missed_polls"] >= seen  # /status says the same
        gate.set()
        done = reads[0]
        await until(lambda: reads[0] >= done + 2)
        assert s.status.missed_polls >= seen  # booked: at least what the scrape showed
        # A second hold, ended by a stop instead of the read: the passed slots are booked.
        before = s.status.missed_polls
        seen = await hold_ten_slots()
        assert s.status.missed_polls == before and seen >= before + 8, (seen, before)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert s.status.slot is None and s.status.missed_pending() == 0
    assert s.status.missed_polls >= seen
    assert _scraped_missed(metrics)["held"] == s.status.missed_polls  # nothing pending now


async def test_missed_polls_scraped_on_an_overloaded_port_never_step_back() -> None:
    """Scraped between every step of five over-subscribed devices, each device's counter only
    grows, and every slot that passed is polled or counted but the one being polled and the
    latest due."""
    from gatewayd.metrics import Metrics
    from gatewayd.sampler import PortLoads

    metrics = Metrics()
    lock = asyncio.Lock()
    devices = [_PortDevice(f"d{i}", lock, 0.005) for i in range(5)]
    samplers = [Sampler(d, 0.01, 1.0, 0.0, 1.0, _Sink(), metrics, ports=PortLoads())
                for d in devices]
    last: dict[str, float] = {}
    steps = 0
    gaps: list[float] = []
    stepped_back: list[tuple[str, float, float]] = []  # asserted after: gather hides the task's errors

    async def scrape() -> None:
        nonlocal steps
        while True:
            now = time.monotonic()
            got = _scraped_missed(metrics)
            for name, v in got.items():
                if v < last.get(name, 0.0):
                    stepped_back.append((name, v, last[name]))
                last[name] = v
            for d in devices:
                if d.first:  # slots started since the first: polled, counted, or the due one
                    slots = int((now - d.first) // 0.01) + 1
                    gaps.append(slots - d.reads - got[d.name])
            steps += 1
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(s.run()) for s in samplers]
    scraper = asyncio.create_task(scrape())
    try:
        await until(lambda: sum(d.reads for d in devices) >= 300, 60)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        scraper.cancel()
        await asyncio.gather(scraper, return_exceptions=True)
    assert not scraper.done() or scraper.cancelled()  # it scraped until stopped, without error
    assert not stepped_back, stepped_back
    assert steps > 100
    final = _scraped_missed(metrics)
    for s in samplers:
        assert final[s.status.name] >= last[s.status.name]
        assert final[s.status.name] == s.status.missed_polls
    # Uncounted at most: the slot being polled and the latest due one (counted ahead by one
    # when a quick late read skips the due slot). Booked only when a poll ends, it was up to 4.
    assert min(gaps) >= -1 and max(gaps) <= 2, (min(gaps), max(gaps))


async def test_a_failing_device_backing_off_does_not_make_its_port_over_subscribed() -> None:
    """Slots slept through in back-off are missed polls of that device, not port load."""
    from gatewayd.sampler import PortLoads

    class Dead(Driver):
        @dataclass
        class Config:
            port: str

        async def read(self) -> list[Reading]:
            raise DriverError(self.name, "no response from unit 9")

    ports = PortLoads(window_s=0.05)
    s = Sampler(Dead("dead", Dead.Config("/dev/ttyTEST1"), None), 0.01, 1.0, 0.0, 0.2,  # type: ignore[arg-type]
                _Sink(), ports=ports)
    with capture_logs() as logs:
        task = asyncio.create_task(s.run())
        try:
            await until(lambda: s.status.failures >= 8 and s.status.missed_polls > 20, 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    port = ports.status()["/dev/ttyTEST1"]
    assert port["over_subscribed"] is False and port["missed_polls"] == 0
    assert not [e for e in logs if e["event"] == "serial_port_oversubscribed"]


class _Gate(Driver):
    """Blocks in read until `release` is set; then gives one reading, fails, or raises a bug."""

    def __init__(self, name: str, outcome: str) -> None:
        super().__init__(name, None, None)  # type: ignore[arg-type]
        self.outcome = outcome
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def read(self) -> list[Reading]:
        self.entered.set()
        await self.release.wait()
        self.release.clear()
        self.entered.clear()
        if self.outcome == "fail":
            raise DriverError(self.name, "no answer")
        if self.outcome == "bug":
            raise ZeroDivisionError("driver bug")
        return [Reading(self.name, "x", 1.0, now_ms())]


async def test_a_poll_is_under_way_for_the_queue_from_read_to_submit_on_every_path(tmp_path: Path) -> None:
    # The queue's group commit waits for polls under way: a sampler that left one counted
    # after a failure, a driver's bug or a cancel would delay every later commit by the window.
    q = Queue(tmp_path / "q.db", QueueConfig(commit_window=0.01), ["a"])
    await q.open()
    qtask = asyncio.create_task(q.run())
    try:
        for outcome in ("ok", "fail", "bug", "cancel"):
            drv = _Gate(f"dev-{outcome}", outcome)
            s = Sampler(drv, 3600.0, 30.0, 0.0, 3600.0, q)
            task = asyncio.create_task(s.run())
            await asyncio.wait_for(drv.entered.wait(), 10)
            assert q.polls_in_flight == 1, outcome
            if outcome == "cancel":
                task.cancel()
            else:
                drv.release.set()
            if outcome == "ok":
                await until(lambda s=s: s.status.reads == 1)
                assert q.polls_in_flight == 0  # ended with the submit, not at the next slot
                task.cancel()
            elif outcome == "fail":
                await until(lambda s=s: s.status.failures == 1)
                assert q.polls_in_flight == 0
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert q.polls_in_flight == 0, outcome
    finally:
        qtask.cancel()
        await asyncio.gather(qtask, return_exceptions=True)
        await q.close()


class Clocked(Driver):
    """Records when each read is made (time.monotonic())."""

    def __init__(self, name: str) -> None:
        super().__init__(name, None, None)  # type: ignore[arg-type]
        self.at: list[float] = []

    async def read(self) -> list[Reading]:
        self.at.append(time.monotonic())
        return []


async def test_devices_of_one_interval_poll_on_the_same_tick_without_jitter() -> None:
    # started at different moments within one tick (100 ms at a 1 s interval), three devices
    # with the default jitter (0) wake on the same grid tick from their second poll on: one
    # wake-up and one commit for all of them, not one each
    from gatewayd.config import DeviceCommon

    jitter = DeviceCommon("d", "sim").jitter
    assert jitter == 0.0
    tick = 0.1
    # start just after a grid tick, so that all three starts fall within one tick
    await asyncio.sleep(tick - time.monotonic() % tick + 0.002)
    drivers = [Clocked(f"d{i}") for i in range(3)]
    tasks = []
    for i, d in enumerate(drivers):
        s = Sampler(d, 1.0, 1.0, jitter, 5.0, object())
        tasks.append(asyncio.create_task(s.run(), name=d.name))
        if i < 2:
            await asyncio.sleep(0.01)  # staggered starts, 10 ms apart
    try:
        await until(lambda: all(len(d.at) >= 3 for d in drivers))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    firsts = [d.at[0] for d in drivers]
    assert max(firsts) - min(firsts) >= 0.015  # the starts really were apart
    for n in (1, 2):
        polls = [d.at[n] for d in drivers]
        # the same timer deadline fires all three in one loop iteration (a tick apart, else)
        assert max(polls) - min(polls) < 0.02, (n, polls)
        assert abs(polls[0] - firsts[0] - 1.0 * n) < tick + 0.03, (n, polls[0] - firsts[0])
