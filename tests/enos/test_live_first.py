"""Live first against the EnOS simulator: the backlog drains as `resume`, paced, while live
readings go as `post` at once; each in order per series."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from drivers.base import Reading
from gatewayd_sim.enos import EnosSimulator
from tests.enos.conftest import Rig

BACKLOG = 200_000
BATCH = 1000
RATE = 50  # messages/s: EnOS limits messages, so the backlog is paced in messages


def in_order_per_series(points: list) -> bool:
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for p in points:
        by[(p.device_key, p.point)].append(p.value)
    return all(v == sorted(v) for v in by.values())


async def test_backlog_drains_paced_as_resume_while_live_goes_as_post_within_a_second(
        rig: Rig, sim: EnosSimulator) -> None:
    ts0 = 1_700_000_000_000
    for start in range(0, BACKLOG, 20_000):  # meter1.temp and meter2.temp, values = order
        assert await rig.queue.put([Reading(f"meter{1 + i % 2}", "temp", float(start + i),
                                            ts0 + start + i) for i in range(20_000)])
    uplink = rig.start_uplink(batch_max_points=BATCH, backlog_rate=RATE)
    await rig.wait_state("connected")
    started = time.monotonic()
    committed: dict[float, float] = {}  # live value -> when its commit returned
    live_value = 0.0
    while len(sim.points("resume")) < BACKLOG:
        live_value += 1
        assert await rig.queue.put([Reading("cpu", "load", live_value, ts0 + int(live_value))])
        committed[live_value] = time.monotonic()
        if len(committed) % 25 == 0:
            drain = uplink.status()["drain"]
            assert drain["draining"] and drain["rows"] > 0 and drain["percent"] is not None
        await asyncio.sleep(0.02)  # the live stream's own pace (50 readings/s), not a sync wait
    drained_s = time.monotonic() - started
    await sim.wait_until(lambda: len(sim.points("post")) == len(committed))

    # Paced: 200 messages at 50/s cannot take less than 199/50 s.
    assert drained_s >= (BACKLOG / BATCH - 1) / RATE * 0.98
    resumed, posted = sim.points("resume"), sim.points("post")
    assert len(resumed) == BACKLOG and {p.point for p in resumed} == {"temp"}
    assert {p.point for p in posted} == {"cpuLoad"}
    assert in_order_per_series(resumed) and in_order_per_series(posted)
    # Every live reading reached the hub within 1 s of its commit, while the backlog drained.
    late = {p.value: round(p.rx - committed[p.value], 3) for p in posted
            if p.rx - committed[p.value] > 1.0}
    assert not late, f"live readings later than 1 s: {late}"
    assert len(committed) > 100  # the live stream really ran beside the backlog
    await rig.acked(rig.queue.tail)
    status = uplink.status()["drain"]
    assert not status["draining"] and status["rows"] == 0


async def test_live_first_off_keeps_strict_queue_order(rig: Rig, sim: EnosSimulator) -> None:
    assert await rig.queue.put([Reading("meter1", "temp", float(i), 1_700_000_000_000 + i)
                                for i in range(3000)])
    uplink = rig.start_uplink(batch_max_points=BATCH, live_first=False)
    await rig.wait_state("connected")
    assert await rig.queue.put([Reading("meter1", "temp", 3000.0, 1_700_000_003_000)])
    await sim.wait_until(lambda: len(sim.points()) == 3001)
    assert [p.value for p in sim.points()] == [float(i) for i in range(3001)]
    assert uplink.status()["drain"]["live_first"] is False
