"""The EnOS uplink end to end against the simulator: real sockets, real queue, real dispatcher."""

from __future__ import annotations

from drivers.base import Reading
from gatewayd.sim.enos import EnosSimulator
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
