"""The EnOS uplink end to end against the simulator: real sockets, real queue, real dispatcher."""

from __future__ import annotations

import asyncio

import pytest

from drivers.base import Reading
from gatewayd_sim.enos import EnosSimulator
from tests.enos.conftest import GW, SUBS, Rig


async def test_live_data_goes_through_post_batch_for_logged_in_sub_devices(
        rig: Rig, sim: EnosSimulator) -> None:
    uplink = rig.start_uplink()
    await rig.wait_state("connected")
    assert sim.logged_in(GW) == set(SUBS.values())
    await rig.queue.put([Reading("meter1", "temp", 21.5, 1_700_000_000_000),
                         Reading("meter2", "temp", 19.0, 1_700_000_000_000, 1),
                         Reading("cpu", "load", 0.25, 1_700_000_000_001)])
    await sim.wait_until(lambda: len(sim.points()) == 3)
    pts = {(p.device_key, p.point): p for p in sim.points()}
    assert pts[("meter-001", "temp")].value == 21.5
    assert pts[("meter-001", "temp")].how == "post"
    assert pts[("meter-001", "temp")].ts_ms == 1_700_000_000_000
    assert (pts[("meter-002", "temp")].value, pts[("meter-002", "temp")].quality) == (19.0, 1)
    assert pts[("gw-001", "cpuLoad")].value == 0.25  # the gateway's own point, no keys
    await rig.acked(3)
    assert uplink.status()["points_post"] == 3


async def test_wrong_secret_is_refused_and_waits_the_full_cap(rig: Rig, sim: EnosSimulator) -> None:
    from gatewayd.schema import Secret
    uplink = rig.start_uplink(device_secret=Secret("not-the-secret"), backoff_cap=30.0)
    await rig.wait_state("auth_failed")
    assert "refused the login" in uplink.last_error
    assert [c.code for c in sim.hub.connects] == [4]  # CONNACK: bad username or password
    assert not sim.online(GW)
    assert "not-the-secret" not in str(uplink.status())


async def test_dynamic_activation_persists_the_secret_0600_and_reconnects_with_it(
        rig: Rig, sim: EnosSimulator) -> None:
    from gatewayd.schema import Secret
    uplink = rig.start_uplink(product_key="DYNPK", device_key="dyn-gw", device_secret=None,
                              product_secret=Secret("dynProductSecret"), subs=(),
                              backoff_base=0.05)
    await sim.wait_until(lambda: sim.online(("DYNPK", "dyn-gw"))
                         and sim.hub.sessions[("DYNPK", "dyn-gw")].state.secure_mode == "2")
    await rig.wait_state("connected")
    stored = uplink.secret_path.read_text()
    assert stored == sim.registry.devices[("DYNPK", "dyn-gw")].secret
    assert uplink.secret_path.stat().st_mode & 0o777 == 0o600
    assert [c.secure_mode for c in sim.hub.connects] == ["3", "2"]
    await rig.queue.put([Reading("cpu", "load", 0.5, 1_700_000_000_000)])
    await sim.wait_until(lambda: len(sim.points(device_key="dyn-gw")) == 1)
    # A restart of the uplink uses the stored secret straight away (mode 2, no activation).
    await rig.stop_uplink()
    rig.start_uplink(product_key="DYNPK", device_key="dyn-gw", device_secret=None,
                     product_secret=Secret("dynProductSecret"), subs=())
    await rig.wait_state("connected")
    assert [c.secure_mode for c in sim.hub.connects] == ["3", "2", "2"]


async def test_topology_is_reconciled_and_optionally_pruned(rig: Rig, sim: EnosSimulator) -> None:
    from gatewayd_sim.enos import Device
    extra = sim.registry.add_device(Device("SUBPK01", "meter-old", "x", "sub"))
    sim.registry.devices[GW].topology.add(extra.key)
    rig.start_uplink(prune_topology=True)
    await rig.wait_state("connected")
    assert sim.registry.devices[GW].topology == set(SUBS.values())
    methods = [r.method for r in sim.hub.requests]
    assert methods[:3] == ["thing.topo.get", "thing.topo.add", "thing.topo.delete"]
    adds = [r for r in sim.hub.requests if r.method == "thing.topo.add"]
    assert len(adds) == 1 and adds[0].code == 200  # meter2 and relay, in one request


async def test_batch_login_with_one_disabled_sub_device(rig: Rig, sim: EnosSimulator) -> None:
    sim.registry.devices[SUBS["meter2"]].topology = set()
    sim.registry.devices[GW].topology.add(SUBS["meter2"])
    sim.registry.devices[SUBS["meter2"]].enabled = False
    uplink = rig.start_uplink()
    await rig.wait_state("connected")
    assert sim.logged_in(GW) == {SUBS["meter1"], SUBS["relay"]}
    st = uplink.status()["sub_devices"]
    assert st["meter2"]["state"] == "failed" and st["meter2"]["code"] == 723
    assert st["meter1"]["state"] == "logged_in"
    # Data of the disabled one is quarantined; the rest flows; the cursor never wedges.
    await rig.put("meter2", "temp", 3)
    await rig.put("meter1", "temp", 2)
    await rig.acked(5)
    assert [p.value for p in sim.points(device_key="meter-001")] == [3.0, 4.0]
    assert sim.points(device_key="meter-002") == []
    assert rig.outbox is not None
    assert [r for _, r, _ in rig.outbox.quarantined] == ["code_1212"] * 3
    # Re-enabled in the cloud: the retry loop logs it in again.
    sim.registry.devices[SUBS["meter2"]].enabled = True
    rec = sim.combine(GW, "enable", [SUBS["meter2"]])
    assert (await sim.wait_reply(rec))["code"] == 200
    await sim.wait_until(lambda: SUBS["meter2"] in sim.logged_in(GW))


async def test_backlog_after_an_outage_goes_through_resume(rig: Rig, sim: EnosSimulator) -> None:
    uplink = rig.start_uplink(backoff_base=0.5)
    await rig.wait_state("connected")
    live = await rig.put("meter1", "temp", 10)
    await rig.acked(10)
    await sim.go_offline()
    await rig.wait_state("backing_off")
    backlog = await rig.put("meter1", "temp", 20)
    await sim.go_online()
    await rig.wait_state("connected")
    more_live = await rig.put("meter1", "temp", 5)
    await rig.acked(35)
    assert sorted(p.value for p in sim.points(how="post")) == [float(v) for v in live + more_live]
    assert sorted(p.value for p in sim.points(how="resume")) == [float(v) for v in backlog]
    assert uplink.status()["points_resume"] == 20
    # The new connection re-subscribed before its first request: every reply was delivered.
    assert all(r.delivered for r in sim.hub.requests)


async def test_simulator_restart_mid_stream_loses_nothing(rig: Rig, sim: EnosSimulator) -> None:
    batch = 200
    rig.start_uplink(backoff_base=0.5, batch_max_points=batch)
    await rig.wait_state("connected")
    sent: list[int] = []
    for i in range(30):
        sent += await rig.put(("meter1", "meter2", "cpu")[i % 3], "temp" if i % 3 < 2 else "load",
                              100)
        if i in (10, 20):  # twice: a second drop must be survived as well as the first
            await sim.restart()
            await sim.wait_until(lambda: sim.logged_in(GW) == set(SUBS.values()))
    await rig.acked(len(sent), timeout_s=20)
    got = [int(p.value) for p in sim.points()]
    assert set(got) == set(sent)  # nothing lost
    assert len(got) - len(set(got)) <= batch  # duplicates bounded by one in-flight lease
    assert [c.code for c in sim.hub.connects] == [0, 0, 0]
    assert sim.logged_in(GW) == set(SUBS.values())  # logged in again after the restart
    assert all(r.delivered for r in sim.hub.requests)
    ids = [(r.conn_id, r.msg_id) for r in sim.hub.requests]
    assert len(ids) == len(set(ids))  # request ids are never reused on a connection


async def test_lost_replies_are_resent(rig: Rig, sim: EnosSimulator) -> None:
    sim.hub.drop_replies = 1
    rig.start_uplink(request_timeout=0.3)
    await rig.wait_state("connected")
    vals = await rig.put("meter1", "temp", 5)
    await rig.acked(5)
    assert sim.hub.counts["replies_dropped"] == 1
    assert sorted({p.value for p in sim.points()}) == [float(v) for v in vals]


async def test_model_mismatch_is_quarantined_without_wedging(rig: Rig, sim: EnosSimulator) -> None:
    uplink = rig.start_uplink()
    await rig.wait_state("connected")
    await rig.queue.put([Reading("meter1", "temp", 1.0, 1_700_000_000_000),
                         Reading("meter1", "count", "not-a-number", 1_700_000_000_000),
                         Reading("meter2", "temp", 2.0, 1_700_000_000_001),
                         Reading("meter1", "temp", 3.0, 1_700_000_000_002)])
    await rig.acked(4)
    assert sorted(p.value for p in sim.points()) == [1.0, 2.0, 3.0]
    assert rig.outbox is not None
    assert [(seq, r) for seq, r, _ in rig.outbox.quarantined] == [(2, "code_1204")]
    assert uplink.status()["quarantined"] == 1


@pytest.mark.parametrize("policy", ["skip", "quarantine", "gateway"])
async def test_unmapped_devices_follow_the_policy(rig: Rig, sim: EnosSimulator,
                                                  policy: str) -> None:
    uplink = rig.start_uplink(unmapped=policy)
    await rig.wait_state("connected")
    await rig.queue.put([Reading("attic-env", "temp", 1.0, 1), Reading("meter1", "temp", 2.0, 2)])
    await rig.acked(2)
    got = {(p.device_key, p.point, p.value) for p in sim.points()}
    assert rig.outbox is not None
    if policy == "gateway":
        assert got == {("meter-001", "temp", 2.0), ("gw-001", "attic_env_temp", 1.0)}
    else:
        assert got == {("meter-001", "temp", 2.0)}
    assert [r for _, r, _ in rig.outbox.quarantined] == (["unmapped"] if policy == "quarantine"
                                                         else [])
    assert uplink.status()["skipped_unmapped"] == (1 if policy == "skip" else 0)


async def test_driver_failures_reported_by_samplers_become_events(rig: Rig, sim: EnosSimulator) -> None:
    """A failing driver sends no readings; the sampler's state feed still reaches EnOS, also
    for a change that happened while the hub was unreachable."""
    uplink = rig.start_uplink(post_device_faults=True)
    await rig.wait_state("connected")
    uplink.device_state("meter1", True, "meter1: no answer from unit 1", 1_700_000_000_000)
    await sim.hub.wait_until(lambda: len(sim.hub.events) == 1, timeout_s=5)
    key, event, body, _ = sim.hub.events[0]
    assert (key, event, body["faulty"]) == (SUBS["meter1"], "deviceFault", True)
    assert body["error"] == "meter1: no answer from unit 1"
    uplink.device_state("not-mapped", True, "x", 1)  # devices EnOS does not know are ignored
    await sim.restart()
    uplink.device_state("meter1", False, "", 1_700_000_000_500)  # recovered while reconnecting
    await sim.hub.wait_until(lambda: len(sim.hub.events) == 2, timeout_s=15)
    key, event, body, _ = sim.hub.events[1]
    assert (key, body["faulty"]) == (SUBS["meter1"], False)


async def test_device_faults_are_posted_as_events(rig: Rig, sim: EnosSimulator) -> None:
    rig.start_uplink(post_device_faults=True)
    await rig.wait_state("connected")
    await rig.queue.put([Reading("meter1", "temp", None, 1_700_000_000_000, 2)])  # BAD
    await rig.acked(1)
    await rig.queue.put([Reading("meter1", "temp", 20.0, 1_700_000_000_100)])
    await rig.acked(2)
    assert [(key, ev, body["faulty"]) for key, ev, body, _ in sim.hub.events] == [
        (SUBS["meter1"], "deviceFault", True), (SUBS["meter1"], "deviceFault", False)]
    assert rig.outbox is not None and rig.outbox.quarantined[0][1] == "no_value"
    assert [p.value for p in sim.points()] == [20.0]


async def test_short_outages_do_not_trip_the_login_throttle(rig: Rig, sim: EnosSimulator) -> None:
    """The hub allows 4 logins per 2 min; attempts refused at TCP level never reached it, so
    they must not count (they turned 0.5-5 s outages into 40-112 s stalls)."""
    import time

    from gatewayd.uplinks.base import UplinkState
    uplink = rig.start_uplink(backoff_base=0.05, backoff_cap=0.3)
    await rig.wait_state("connected")
    for _ in range(2):
        await sim.go_offline()
        await uplink.wait_for_state(UplinkState.BACKING_OFF, UplinkState.CONNECTING)
        before = uplink.status()["connect_attempts"]["unreachable"]
        async with asyncio.timeout(10):
            while uplink.status()["connect_attempts"]["unreachable"] < before + 5:
                await asyncio.sleep(0.02)
        await sim.go_online()
        t0 = time.monotonic()
        await rig.wait_state("connected")
        assert time.monotonic() - t0 < 5
    assert uplink.status()["connect_attempts"]["seen"] == 3
