"""The shared simulator kit: one fault API and one control route for every simulator."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gatewayd_sim.kit import Changes, Faults
from gatewayd_sim.mms import MmsSimulator
from gatewayd_sim.opshub import OpsHubSimulator


def test_faults_by_name_stage_count_and_match() -> None:
    f = Faults({"slow": "", "drop": ""}, ["publish", "login"])
    f.inject("slow", "publish", 2, delay_s=3)
    f.inject("drop", match="boom")
    assert f.take("slow", "login") is None  # another stage
    assert f.take_any("login") is None  # drop wants its match
    assert f.take("drop", "login", {"x": "boom"}) is not None  # until cleared
    got = f.take("slow", "publish")
    assert got is not None and got.options == {"delay_s": 3}
    assert f.take("slow", "publish") is not None and f.take("slow", "publish") is None  # used up
    with pytest.raises(ValueError, match="unknown fault"):
        f.inject("nope")
    with pytest.raises(ValueError, match="unknown stage"):
        f.inject("slow", "logout")
    f.set_from_json([{"name": "slow", "count": 1}, {"kind": "drop", "stage": "login"}])
    f.set_from_json({"slow": False})
    assert [x.name for x in f.active] == ["drop", "drop"]


async def test_changes_wake_waiters() -> None:
    c, state = Changes(), {"n": 0}

    async def bump() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
            state["n"] += 1
            c.touch()
    task = asyncio.create_task(bump())
    await c.wait_for(lambda: state["n"] == 3, timeout_s=5)
    await task
    with pytest.raises(TimeoutError):
        await c.wait_for(lambda: False, timeout_s=0.05)


@pytest.mark.parametrize("make", [lambda: MmsSimulator(port=0), lambda: OpsHubSimulator(port=0)],
                         ids=["mms", "opshub"])
async def test_both_simulators_speak_the_same_control_route(make) -> None:
    async with make() as sim, aiohttp.ClientSession() as http:
        name = next(iter(sim.faults.known))
        async with http.post(f"{sim.url}/sim/faults", json={"name": name, "count": 2}) as r:
            assert r.status == 200
            assert (await r.json())["active"] == [{"name": name, "stage": "*", "count": 2}]
        async with http.post(f"{sim.url}/sim/faults", json={"name": "no-such"}) as r:
            assert r.status == 400
        async with http.delete(f"{sim.url}/sim/faults") as r:
            assert (await r.json())["active"] == []
