"""Packing readings into measure-point batches under the size limit (pure, no I/O), and 512 KB
end to end against the simulator."""

from __future__ import annotations

import json

from drivers.base import Reading
from gatewayd.uplinks.base import Item
from gatewayd.uplinks.enos.packing import Message, Target, build_entries, pack
from gatewayd.uplinks.enos.protocol import MAX_PAYLOAD_BYTES
from gatewayd_sim.enos import EnosSimulator
from tests.enos.conftest import Rig

_TARGETS = {"m1": Target("SUBPK01", "meter-001", "temp", False),
            "m2": Target("SUBPK01", "meter-002", "temp", True),
            "gw": Target(None, None, "cpuLoad", False)}


def _items(n: int, device: str = "m1", value: object = 1.5, backlog: bool = False,
           ts_step: int = 1) -> list[Item]:
    return [Item(i + 1, Reading(device, "temp", value, 1_700_000_000_000 + i * ts_step),  # type: ignore[arg-type]
                 backlog) for i in range(n)]


def _pack(items: list[Item], max_bytes: int) -> tuple[list[Message], list[tuple[int, str]]]:
    rejected: list[tuple[int, str]] = []

    def reject(it: Item, reason: str, detail: str) -> None:
        rejected.append((it.seq, reason))

    entries = build_entries(items, lambda it: _TARGETS[it.reading.device], reject)
    return pack(entries, max_bytes, reject), rejected


def _payload(msg: Message) -> bytes:
    """The longest envelope the uplink builds around a message's params."""
    return (b'{"id":"123456","version":"1.0","method":"thing.measurepoint.resume.batch",'
            b'"allowOfflineSubDevice":false,"skipInvalidMeasurepoints":false,"params":'
            + msg.params_json() + b"}")


def test_items_merge_per_device_and_timestamp_and_carry_quality() -> None:
    items = [Item(1, Reading("m1", "temp", 1.0, 10), False),
             Item(2, Reading("m2", "temp", 2.0, 10, 2), False),
             Item(3, Reading("gw", "temp", 0.5, 10), False),
             Item(4, Reading("m1", "temp", 3.0, 11), False)]
    msgs, rejected = _pack(items, 64 * 1024)
    assert rejected == [] and len(msgs) == 1
    params = json.loads(msgs[0].params_json())
    assert params == [
        {"productKey": "SUBPK01", "deviceKey": "meter-001", "measurepoints": {"temp": 1.0},
         "time": 10},
        {"productKey": "SUBPK01", "deviceKey": "meter-002",
         "measurepoints": {"temp": {"value": 2.0, "quality": 2}}, "time": 10},
        {"measurepoints": {"cpuLoad": 0.5}, "time": 10},  # the gateway: no keys
        {"productKey": "SUBPK01", "deviceKey": "meter-001", "measurepoints": {"temp": 3.0},
         "time": 11}]


def test_backlog_and_live_never_share_a_message() -> None:
    msgs, _ = _pack(_items(3, backlog=True) + _items(2), 64 * 1024)
    assert [(m.resume, len(m.items)) for m in msgs] == [(True, 3), (False, 2)]


def test_messages_stay_under_the_limit_and_never_over_512k() -> None:
    items = _items(12_000, value="x" * 40)
    for limit in (8 * 1024, 100_000, 10 * 1024 * 1024):
        msgs, rejected = _pack(items, limit)
        assert rejected == []
        assert sum(len(m.items) for m in msgs) == 12_000
        cap = min(limit, MAX_PAYLOAD_BYTES)
        assert all(len(_payload(m)) <= cap for m in msgs)
        assert len(_payload(msgs[0])) > cap * 0.9  # and they are well filled


def test_a_single_point_larger_than_the_limit_is_rejected_not_wedged() -> None:
    items = [Item(1, Reading("m1", "temp", "y" * 600_000, 1), False),
             Item(2, Reading("m1", "temp", 2.0, 2), False)]
    msgs, rejected = _pack(items, MAX_PAYLOAD_BYTES)
    assert rejected == [(1, "too_large")]
    assert [it.seq for m in msgs for it in m.items] == [2]


def test_halves_isolate_a_point() -> None:
    items = [Item(1, Reading("m1", "temp", 1.0, 5), False),
             Item(2, Reading("m1", "temp", 2.0, 6), False)]
    msgs, _ = _pack(items, 64 * 1024)
    left, right = msgs[0].halves()
    assert [i.seq for i in left.items] == [1] and [i.seq for i in right.items] == [2]
    assert left.halves() == [left]


async def test_512k_packing_end_to_end(rig: Rig, sim: EnosSimulator) -> None:
    uplink = rig.start_uplink(max_message_bytes=MAX_PAYLOAD_BYTES)
    await rig.wait_state("connected")
    big = "z" * 1000
    await rig.queue.put([Reading("meter1", "status", big, 1_700_000_000_000 + i)
                         for i in range(2000)])  # ~2 MB: at least four full messages
    await rig.acked(2000, timeout_s=20)
    assert len(sim.points()) == 2000
    batches = [r for r in sim.hub.requests if r.method == "thing.measurepoint.post.batch"]
    assert len(batches) >= 4 and all(r.code == 200 for r in batches)
    assert uplink.status()["quarantined"] == 0


def test_messages_come_out_in_queue_order_across_lanes() -> None:
    """The last, partly filled resume message goes before the live ones (it used to go last,
    and with 8 in flight backlog landed after newer live readings of the same series)."""
    backlog = _items(300, value="x" * 40, backlog=True)
    live = [Item(it.seq + 300, Reading("m1", "temp", "y" * 40, it.reading.ts_ms + 10_000), False)
            for it in _items(300)]
    msgs, _ = _pack(backlog + live, 8 * 1024)
    seqs = [it.seq for m in msgs for it in m.items]
    assert seqs == sorted(seqs) == list(range(1, 601))
    kinds = [m.resume for m in msgs]
    assert kinds == sorted(kinds, reverse=True) and kinds[0] and not kinds[-1]
