"""The uplink contract: what the delivery engine promises, checked for every uplink against its
real simulator or broker (harnesses in conftest.py). A test runs for every harness that has
the feature it needs."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gatewayd.config import parse
from gatewayd.errors import ConfigError
from gatewayd.uplinks.base import UplinkState
from tests.contract.conftest import HARNESSES, Harness, with_feature

ALL = list(HARNESSES)
param = pytest.mark.parametrize


@param("harness", ALL, indirect=True)
async def test_ordered_acks_and_order_per_series(harness: Harness) -> None:
    harness.start_uplink()
    await harness.connected()
    for k in range(4):
        await harness.put(range(k * 150, (k + 1) * 150))
        await harness.put(range(k * 150, (k + 1) * 150), device="meter2")
    await harness.acked(1200)
    assert await harness.values(at_least=600) == [float(v) for v in range(600)]
    assert await harness.values("meter2", at_least=600) == [float(v) for v in range(600)]
    assert harness.acks == sorted(harness.acks) and harness.acks[-1] == 1200


@param("harness", with_feature("poison"), indirect=True)
async def test_poison_is_quarantined_and_everything_else_delivered(harness: Harness) -> None:
    harness.start_uplink()
    await harness.connected()
    await harness.put(range(0, 40))
    assert await harness.queue.put([harness.poison()])
    await harness.put(range(40, 80))
    await harness.acked(81)
    # Everything else arrives once. (With several packets in flight, the halves of a bisected
    # packet may arrive after the packets behind it.)
    got = await harness.values(at_least=80)
    assert sorted(got) == [float(v) for v in range(80)]
    assert harness.up is not None and harness.up.status()["quarantined"] == 1


@param("harness", with_feature("unknown_answer"), indirect=True)
async def test_an_unknown_answer_is_retried_not_dropped(harness: Harness) -> None:
    harness.start_uplink()
    await harness.connected()
    harness.unknown_answers(2)
    await harness.put(range(50))
    await harness.acked(50)
    assert sorted(set(await harness.values(at_least=50))) == [float(v) for v in range(50)]
    assert harness.up is not None and harness.up.status()["quarantined"] == 0


@param("harness", ALL, indirect=True)
async def test_restart_loses_nothing(harness: Harness) -> None:
    harness.start_uplink()
    await harness.connected()
    await harness.put(range(100))
    await harness.acked(100)
    await harness.stop_uplink()
    await harness.put(range(100, 300))  # queued while no uplink runs
    harness.start_uplink()
    await harness.acked(300)
    got = await harness.values(at_least=300)
    assert sorted(set(got)) == [float(v) for v in range(300)]
    assert got[-200:] == [float(v) for v in range(100, 300)]


@param("harness", with_feature("auth"), indirect=True)
async def test_auth_failures_wait_the_cap(harness: Harness) -> None:
    up = harness.start_uplink(bad_auth=True, backoff_cap=0.8)
    attempts: list[float] = []
    set_state = up.set_state

    def spy(state: UplinkState, error: str = "") -> None:
        if state == UplinkState.CONNECTING:
            attempts.append(time.monotonic())
        set_state(state, error)
    up.set_state = spy  # type: ignore[method-assign]
    async with asyncio.timeout(15):
        while len(attempts) < 3:
            await up.wait_for_state(UplinkState.AUTH_FAILED)
            await up.wait_for_state(UplinkState.CONNECTING, UplinkState.AUTHENTICATING)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(g >= 0.8 * 0.9 for g in gaps), gaps  # the cap, jittered down at most 10 %
    assert "auth" in up.last_error.lower() or "refused" in up.last_error.lower()


@param("harness", ALL, indirect=True)
async def test_a_two_second_outage_reconnects_within_ten(harness: Harness) -> None:
    up = harness.start_uplink(backoff_cap=60.0)
    await harness.connected()
    await harness.put(range(10))
    await harness.acked(10)
    await harness.outage_begin()
    await harness.put(range(10, 20))
    await up.wait_for_state(UplinkState.BACKING_OFF, UplinkState.CONNECTING, timeout_s=15)
    await asyncio.sleep(2.0)  # the outage itself
    await harness.outage_end()
    t0 = time.monotonic()
    await harness.acked(20, timeout_s=10)
    assert time.monotonic() - t0 < 10
    assert (await harness.values(at_least=20))[-10:] == [float(v) for v in range(10, 20)]


@param("harness", with_feature("commands"), indirect=True)
async def test_results_survive_a_disconnect(harness: Harness) -> None:
    up = harness.start_uplink()
    await harness.connected()
    harness.relay.gate.clear()
    await harness.command("held-1", True)
    await asyncio.wait_for(harness.relay.entered.wait(), 10)
    await harness.outage_begin()
    await up.wait_for_state(UplinkState.BACKING_OFF, UplinkState.CONNECTING, timeout_s=15)
    harness.relay.gate.set()  # the result is ready while the cloud is away
    async with asyncio.timeout(10):
        while up.status()["results_buffered"] != 1:
            await asyncio.sleep(0.01)
    await harness.outage_end()
    got = await harness.wait_results(1)
    assert got[0] == ("held-1", True, 200)


@param("harness", with_feature("commands"), indirect=True)
async def test_a_redelivered_command_runs_once_a_repeated_one_twice(harness: Harness) -> None:
    harness.start_uplink()
    await harness.connected()
    await harness.command("c-1", True)
    await harness.command("c-1", True)  # the same message again: a redelivery
    got = await harness.wait_results(2)
    await harness.command("c-2", True)  # the same content under a new id: a deliberate repeat
    await harness.command("c-1", False)  # a reused id with other content (a restarted hub)
    got = await harness.wait_results(4)
    assert [g[0] for g in got].count("c-1") == 3 and all(ok for _, ok, _ in got)
    assert harness.relay.actions == [("switch", {"on": True}), ("switch", {"on": True}),
                                     ("switch", {"on": False})]


@param("harness", ALL, indirect=True)
async def test_metrics_exist_at_start(harness: Harness) -> None:
    harness.start_uplink()
    text = generate_latest(harness.metrics.registry).decode()
    for series in ('gatewayd_readings_sent_total{uplink="up"} 0.0',
                   'gatewayd_readings_dropped_total{reason="rejected",uplink="up"} 0.0',
                   'gatewayd_uplink_errors_total{kind="auth",uplink="up"} 0.0',
                   'gatewayd_commands_total{outcome="busy",uplink="up"} 0.0'):
        assert series in text, series


@param("name", [n for n in ALL if n != "jsonl"])  # jsonl names no devices
def test_check_rejects_a_misspelled_device(name: str, tmp_path: Path) -> None:
    h = HARNESSES[name](tmp_path)
    doc = {"gateway": {"id": "gw", "state_dir": str(tmp_path)},
           "devices": [{"name": "meter1", "driver": "sim"}],
           "uplinks": {"up": h.uplink_doc("meterl")}}  # an l for a 1
    with pytest.raises(ConfigError) as err:
        parse(doc, tmp_path / "gatewayd.toml", read_secrets=False)
    assert any("uplinks.up" in p and "'meterl'" in p for p in err.value.problems), \
        err.value.problems
    doc["uplinks"] = {"up": h.uplink_doc("meter1")}
    parse(doc, tmp_path / "gatewayd.toml", read_secrets=False)


@param("harness", ["enos"], indirect=True)
async def test_order_holds_per_series_across_a_hub_restart_with_backlog(harness: Harness) -> None:
    """Live first: backlog (resume) and live (post) of one series each reach the hub in sampling
    order, with 8 messages in flight (the packer once sent the last partial resume message
    last), and every value arrives once."""
    up = harness.start_uplink(max_inflight=8)
    await harness.connected()
    await harness.put(range(100))
    await harness.acked(100)
    await harness.outage_begin()
    await up.wait_for_state(UplinkState.BACKING_OFF, UplinkState.CONNECTING, timeout_s=15)
    await harness.put(range(100, 1100))  # backlog of two series
    await harness.put(range(100, 1100), device="meter2")
    await harness.outage_end()
    await harness.connected()
    await harness.put(range(1100, 1600))  # live, while the backlog drains
    await harness.put(range(1100, 1600), device="meter2")
    await harness.acked(3100, timeout_s=30)
    sim = harness.sim  # type: ignore[attr-defined]
    for dev, n in (("meter1", 1600), ("meter2", 1500)):
        vals = await harness.values(dev, at_least=n)
        assert sorted(vals) == sorted(set(vals)) and len(vals) == n, dev
        dk = {"meter1": "meter-001", "meter2": "meter-002"}[dev]
        for how in ("post", "resume"):
            got = [p.value for p in sim.points(how, dk)]
            assert got == sorted(got), (dev, how)
        assert {p.value for p in sim.points("resume", dk)} >= {float(v) for v in range(100, 1100)}
