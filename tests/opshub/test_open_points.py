"""Open protocol points (opshub.md marks them [open]): with each simulator switch the uplink
delivers everything, with bounded duplicates, and logs in at a bounded rate."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from drivers.base import Reading
from gatewayd.queue import Queue, QueueConfig
from gatewayd.uplinks.base import UplinkContext
from gatewayd.uplinks.opshub import OpsHubUplink
from gatewayd_sim.opshub import OpsHubSimulator

from .conftest import ACCOUNT, PASSWORD, T0_MS, Rig, base_table, build_config, wait_until

DEVICES = [f"dev{i}" for i in range(5)]
PER_DEVICE = 40


def _batch(t0: int, poison: bool = False) -> list[Reading]:
    out = [Reading(d, "t", float(i), t0 + i * 1000) for i in range(PER_DEVICE) for d in DEVICES]
    if poison:
        out[57] = Reading(out[57].device, "t", "poison", out[57].ts_ms)
    return out


def _rows(sim: OpsHubSimulator) -> list[tuple[str, str, str]]:
    return [(r["dc"], r["data"], r["timestamp"]) for r in sim.rows() if r["metric"] == "t"]


@pytest.mark.parametrize(("answer", "stores"), [
    ("array", "all"), ("first", "all"), ("last", "all"), ("none", "all"),
    ("first", "named"), ("last", "named"),
])
async def test_several_channels_answered_in_every_form(rig: Rig, answer: str, stores: str) -> None:
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, idle_timeout_s=600, multi_answer=answer,
                               multi_stores=stores) as sim:
        sim.reject_vals = {"poison"}
        uplink = rig.start(build_config(base_table(sim, poll_interval=0)))
        first = _batch(T0_MS, poison=True)
        await rig.put(first)
        await rig.wait_acked()
        want = {(f"{ACCOUNT}/01-23-45-67-89-ab/{r.device}", str(int(r.value)) if r.value != "poison"
                 else "poison", r.ts_ms) for r in first}
        got = _rows(sim)
        assert len({(dc, v) for dc, v, _ in got}) == len(first) - 1  # all but the poison
        assert not any(v == "poison" for _, v, _ in got)
        assert rig.outbox.quarantined == {"refused": 1}
        assert len(got) - (len(first) - 1) <= len(first)  # at most one extra copy, first lease only
        assert uplink.status()["one_channel_per_publish"] is (answer != "array")
        assert want  # (built for the error message when this fails)

        # From now on the answers are unambiguous: not one duplicate.
        before = len(got)
        second = _batch(T0_MS + 10_000_000)
        await rig.put(second)
        await rig.wait_acked()
        assert len(_rows(sim)) - before == len(second)


async def test_login_ending_earlier_tokens_two_gateways_one_account(tmp_path: Path) -> None:
    """Two gateways on one account, each login ending the other's token: both deliver
    everything, and neither logs in more than about once a second."""
    names = ["gw-a", "gw-b"]
    queue = Queue(tmp_path / "q.db", QueueConfig(commit_window=0.005), names)
    await queue.open()
    tasks = [asyncio.create_task(queue.run(), name="test-queue")]
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, idle_timeout_s=600,
                               login_ends_earlier=True) as sim:
        uplinks = []
        for name in names:
            cfg = build_config(base_table(sim, gateway_id=name, poll_interval=0,
                                          min_login_interval="1s", backoff_cap="4s"))
            ctx = UplinkContext(gateway_id=name, state_dir=tmp_path, outbox=queue.outbox(name),
                                submit_command=lambda c: None)
            up = OpsHubUplink(name, cfg, ctx)
            uplinks.append(up)
            tasks.append(asyncio.create_task(up.run(), name=f"test-uplink[{name}]"))
        started = time.monotonic()
        try:
            n = 0
            for step in range(30):  # a steady trickle: both keep publishing while they fight
                await queue.put([Reading("boiler", "t", float(step * 5 + i), T0_MS + n + i)
                                 for i in range(5)])
                n += 5
                await asyncio.sleep(0.1)
            await wait_until(lambda: all(queue.outbox(x).acked >= queue.tail for x in names),
                             30, "both gateways delivered")
            elapsed = time.monotonic() - started
            for name in names:
                rows = {r["data"] for r in sim.rows(dc=f"{ACCOUNT}/{name}/boiler")}
                assert len(rows) == n, name  # everything arrived
            logins = sim.stats["logins"]
            assert sim.stats["tokens_ended_by_login"] >= 1  # they did fight
            assert logins <= 2 * (elapsed + 2), (logins, elapsed)  # about one a second at most
        finally:
            for t in reversed(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await queue.close()


@pytest.mark.parametrize("consume", [True, False], ids=["consumed-on-read", "kept-until-confirmed"])
async def test_commands_returned_once_or_until_confirmed(rig: Rig, consume: bool) -> None:
    """[open] whether subscribe consumes a command: kept ones run once, and a deliberate
    repeat (on, off, on) runs every time either way."""
    from .test_uplink import COMMANDS, DC
    async with OpsHubSimulator({ACCOUNT: PASSWORD}, idle_timeout_s=600,
                               consume_on_read=consume) as sim:
        rig.start(build_config(base_table(sim, poll_interval="20ms", commands=COMMANDS)))
        relays = rig.actuators["relays"]
        for n, command in enumerate(["relay2=on", "relay2=off", "relay2=on"], start=1):
            sim.clear_commands()
            sim.queue_command(DC, command)
            await wait_until(lambda n=n: len(relays.actions) >= n, 5, f"command {n} ran")
            polls = sim.stats["subscribe_requests"]
            await sim.wait_for(lambda p=polls: sim.stats["subscribe_requests"] >= p + 3)
            assert len(relays.actions) == n  # polled again and again, still run once
        assert [p["state"] for _, p in relays.actions] == [True, False, True]
        assert rig.uplink is not None and rig.uplink.status()["commands_kept_by_server"] is (not consume)
