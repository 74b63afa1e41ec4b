"""The delivery engine against an in-memory cloud: the rules every uplink inherits.

The per-uplink versions (each against its real simulator or broker) are in tests/contract/.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from drivers.base import Command, CommandResult, Reading
from gatewayd.backoff import Throttle
from gatewayd.errors import UplinkAuthError, UplinkUnavailableError, UplinkUnreachableError
from gatewayd.metrics import Metrics
from gatewayd.queue import Queue, QueueConfig
from gatewayd.uplinks.base import Item, UplinkContext, UplinkState
from gatewayd.uplinks.engine import (
    ACCEPTED,
    RETRY,
    DeliveryUplink,
    Malformed,
    Packet,
    Session,
    Verdict,
    rejected,
)


class Cloud:
    """What the fake cloud does: `verdict(items)` per packet; down/auth switches; commands."""

    def __init__(self) -> None:
        self.got: list[Item] = []  # accepted, in arrival order
        self.seen_packets = 0
        self.verdict: Callable[[list[Item]], Verdict | list[Verdict]] = lambda items: ACCEPTED
        self.down = False
        self.auth_refused = False
        self.connects: list[float] = []
        self.commands: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
        self.replies: list[tuple[Any, CommandResult]] = []
        self.replied = asyncio.Event()
        self.drop = asyncio.Event()  # set: the current session fails


class MemSession(Session):
    def __init__(self, cloud: Cloud, delay: Callable[[], float]) -> None:
        self.cloud, self.delay = cloud, delay

    def pack(self, items: list[Item]) -> list[Packet]:
        return [Packet(items[i:i + 7]) for i in range(0, len(items), 7)]

    async def send(self, packet: Packet) -> Verdict | list[Verdict]:
        # The wire keeps order (one TCP stream); only the answers take a random time.
        self.cloud.seen_packets += 1
        v = self.cloud.verdict(packet.items)
        vs = [v] * len(packet.items) if isinstance(v, Verdict) else v
        self.cloud.got += [it for it, x in zip(packet.items, vs, strict=True) if x.accepted]
        await asyncio.sleep(self.delay())
        return v

    async def commands(self) -> AsyncIterator[tuple[Any, Any]]:
        while True:
            yield await self.cloud.commands.get()

    async def reply(self, reply_to: Any, result: CommandResult) -> None:
        if self.cloud.down:
            raise UplinkUnavailableError("gone")
        self.cloud.replies.append((reply_to, result))
        self.cloud.replied.set()

    async def run(self) -> None:
        await self.cloud.drop.wait()
        self.cloud.drop.clear()
        raise UplinkUnavailableError("dropped")


class MemUplink(DeliveryUplink):
    Config = dict
    batch = 50
    window = 4
    backoff_base_s = 0.01
    backoff_cap_s = 0.3

    def __init__(self, name: str, ctx: UplinkContext, cloud: Cloud,
                 delay: Callable[[], float] = lambda: 0.0) -> None:
        super().__init__(name, {}, ctx)
        self.cloud, self.delay = cloud, delay

    async def connect(self) -> Session:
        loop = asyncio.get_running_loop()
        if self.cloud.down:
            raise UplinkUnreachableError("refused")
        self.cloud.connects.append(loop.time())
        if self.cloud.auth_refused:
            raise UplinkAuthError("bad secret")
        return MemSession(self.cloud, self.delay)


class Rig:
    def __init__(self, tmp: Path, **kw: Any) -> None:
        self.metrics = Metrics()
        self.q = Queue(tmp / "q.db", QueueConfig(commit_window=0.005), ["mem"], self.metrics)
        self.cloud = Cloud()
        self.submitted: list[Command] = []
        self.kw = kw
        self.tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> Rig:
        await self.q.open()
        ctx = UplinkContext("gw", Path("."), self.q.outbox("mem"), self.submitted.append,
                            metrics=self.metrics)
        self.up = MemUplink("mem", ctx, self.cloud, **self.kw)
        self.tasks = [asyncio.create_task(self.q.run()), asyncio.create_task(self.up.run())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.q.close()

    async def delivered(self, n: int) -> None:
        ob = self.q.outbox("mem")
        async with asyncio.timeout(20):
            while ob.acked < n:
                await asyncio.sleep(0.005)


def readings(n: int, start: int = 0) -> list[Reading]:
    return [Reading(f"d{i % 3}", "p", float(i), 1000 + i) for i in range(start, start + n)]


async def test_window_keeps_order_and_acks_in_order(tmp_path: Path) -> None:
    rng = random.Random(1)
    acked: list[int] = []
    async with Rig(tmp_path, delay=lambda: rng.uniform(0, 0.003)) as rig:
        ob = rig.q.outbox("mem")
        real_confirm = ob.confirm

        async def spy(lo: int, hi: int) -> None:  # every lane confirms through here
            acked.append(hi)
            await real_confirm(lo, hi)
        ob.confirm = spy  # type: ignore[method-assign]
        for k in range(5):
            await rig.q.put(readings(200, k * 200))
        await rig.delivered(1000)
    assert [it.seq for it in rig.cloud.got] == list(range(1, 1001))
    assert acked == sorted(acked) and acked[-1] == 1000
    assert rig.up.sent == 1000


async def test_poison_is_bisected_out_and_everything_else_delivered(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        poison = {13, 77}
        rig.cloud.verdict = lambda items: rejected("bad_point", "refused") if any(
            it.seq in poison for it in items) else ACCEPTED
        await rig.q.put(readings(100))
        await rig.delivered(100)
    assert sorted(it.seq for it in rig.cloud.got) == [s for s in range(1, 101) if s not in poison]
    assert rig.up.quarantined == {"bad_point": 2}
    assert rig.q.outbox("mem").quarantined == {"bad_point": 2}


async def test_per_item_verdicts_quarantine_only_the_refused(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.cloud.verdict = lambda items: [rejected("range") if it.seq == 5 else ACCEPTED
                                           for it in items]
        await rig.q.put(readings(20))
        await rig.delivered(20)
    assert [it.seq for it in rig.cloud.got] == [s for s in range(1, 21) if s != 5]
    assert rig.cloud.seen_packets == 3  # no bisect needed


async def test_unknown_answer_is_retried_in_order_never_dropped(tmp_path: Path) -> None:
    answers = iter([RETRY] * 3)
    async with Rig(tmp_path, delay=lambda: 0.001) as rig:
        rig.cloud.verdict = lambda items: next(answers, ACCEPTED) if items[0].seq == 8 \
            else ACCEPTED
        await rig.q.put(readings(60))
        await rig.delivered(60)
    seqs = [it.seq for it in rig.cloud.got]
    assert set(seqs) == set(range(1, 61)) and not rig.up.quarantined
    # go-back-N: after a retry everything from the first unconfirmed item goes again, in order
    first = {s: seqs.index(s) for s in range(1, 61)}
    last = {s: len(seqs) - 1 - seqs[::-1].index(s) for s in range(1, 61)}
    assert all(last[s] < last[s + 1] for s in range(1, 60))
    assert first[1] < first[8]


async def test_auth_failure_waits_the_cap(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.cloud.auth_refused = True
        async with asyncio.timeout(5):
            while len(rig.cloud.connects) < 3:
                await asyncio.sleep(0.01)
        assert rig.up.state == UplinkState.AUTH_FAILED
    gaps = [b - a for a, b in zip(rig.cloud.connects, rig.cloud.connects[1:], strict=False)]
    assert all(g >= 0.3 * 0.9 for g in gaps), gaps  # cap 0.3 s, jittered down by at most 10 %


async def test_throttle_counts_only_attempts_the_cloud_saw(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.up.throttle = (2, 3600.0)
        # a fresh run() picks the throttle up
        rig.tasks[1].cancel()
        await asyncio.gather(rig.tasks[1], return_exceptions=True)
        rig.cloud.down = True
        rig.tasks[1] = asyncio.create_task(rig.up.run())
        async with asyncio.timeout(5):
            while rig.q.metrics.uplink_errors.labels("mem", "unreachable")._value.get() < 10:
                await asyncio.sleep(0.01)
        rig.cloud.down = False  # back after 10 refused attempts: connects at once
        await rig.q.put(readings(5))
        await rig.delivered(5)
    assert len(rig.cloud.connects) == 1


def test_throttle_unit() -> None:
    now = [0.0]
    t = Throttle(2, 10, clock=lambda: now[0])
    t.record()
    t.record()
    assert t.wait_s() == 10
    now[0] = 10
    assert t.wait_s() == 0


async def test_commands_carry_reply_to_and_results_survive_a_disconnect(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        await rig.up.wait_for_state(UplinkState.CONNECTED)
        await rig.cloud.commands.put((Command("c1", "mem", "relay", "on", {"ch": 1}), "topic/a"))
        await rig.cloud.commands.put((Malformed("c2", "no action"), "topic/b"))
        async with asyncio.timeout(5):
            while not rig.submitted or not rig.cloud.replies:
                await asyncio.sleep(0.005)
        assert rig.submitted[0].reply_to == "topic/a" and rig.submitted[0].uplink == "mem"
        assert rig.cloud.replies[0][0] == "topic/b" and rig.cloud.replies[0][1].code == 400
        rig.cloud.down = True
        rig.cloud.drop.set()
        await rig.up.wait_for_state(UplinkState.BACKING_OFF, UplinkState.CONNECTING)
        await rig.up.reply(rig.submitted[0], CommandResult("c1", True, 200, "ok"))
        assert rig.up.status()["results_buffered"] == 1
        rig.cloud.replied.clear()
        rig.cloud.down = False
        async with asyncio.timeout(5):
            await rig.cloud.replied.wait()
        assert rig.cloud.replies[-1][0] == "topic/a" and rig.cloud.replies[-1][1].ok


async def test_result_buffer_is_bounded_and_counts_drops(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.up.results_max = 3
        rig.cloud.down = True
        for i in range(5):
            await rig.up.reply(Command(f"c{i}", "mem", "", "x", reply_to=i),
                               CommandResult(f"c{i}", True, 200))
        assert rig.up.results_dropped == 2
        assert rig.metrics.commands.labels("mem", "result_dropped")._value.get() == 2
        rig.cloud.down = False
        async with asyncio.timeout(5):
            while len(rig.cloud.replies) < 3:
                await asyncio.sleep(0.005)
        assert [r[0] for r in rig.cloud.replies] == [2, 3, 4]


async def test_every_series_exists_at_start(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    rig = Rig(tmp_path)
    await rig.q.open()
    try:
        MemUplink("mem", UplinkContext("gw", tmp_path, rig.q.outbox("mem"), lambda c: None,
                                       metrics=rig.metrics), rig.cloud)
        text = generate_latest(rig.metrics.registry).decode()
    finally:
        await rig.q.close()
    for series in ('gatewayd_readings_sent_total{uplink="mem"} 0.0',
                   'gatewayd_readings_acked_total{uplink="mem"} 0.0',
                   'gatewayd_readings_dropped_total{reason="rejected",uplink="mem"} 0.0',
                   'gatewayd_uplink_errors_total{kind="auth",uplink="mem"} 0.0',
                   'gatewayd_commands_total{outcome="busy",uplink="mem"} 0.0'):
        assert series in text, series
