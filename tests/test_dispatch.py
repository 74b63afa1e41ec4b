"""The dispatcher: command map validation, dedupe, timeouts, failures, serialization."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from drivers.base import Actuator, Command, CommandResult
from drivers.logact import LogActuator, LogActuatorConfig
from gatewayd.config import CommandMap, DispatchSection, ParamSpec
from gatewayd.dispatch import Dispatcher


class SlowActuator(Actuator):
    """Records overlapping calls: the dispatcher must never run two at once."""

    def __init__(self) -> None:
        super().__init__("slow", None, None)  # type: ignore[arg-type]
        self.active = 0
        self.max_active = 0
        self.release = asyncio.Event()
        self.calls: list[dict[str, Any]] = []

    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.release.wait()
            self.calls.append(dict(params))
            return {"done": params.get("n")}
        finally:
            self.active -= 1


class BuggyActuator(Actuator):
    async def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        raise ZeroDivisionError("bug in driver")


COMMANDS = [
    CommandMap(action="set_relay", actuator="relay", uplink="*", actuator_action="set",
               params={"channel": ParamSpec("int", min=0, max=7), "on": ParamSpec("bool"),
                       "label": ParamSpec("str", required=False)}),
    CommandMap(action="set_relay", actuator="relay", uplink="enos", device="boiler",
               actuator_action="set_boiler", params={"on": ParamSpec("bool")}),
    CommandMap(action="setpoint", actuator="relay", params={"value": ParamSpec("float", min=-10, max=45.5)},
               fixed={"register": 40001}),
    CommandMap(action="relay_on", actuator="relay", actuator_action="set",
               params={"operand": ParamSpec("int", min=0, max=7, to="channel")}, fixed={"on": True}),
    CommandMap(action="fail", actuator="relay"),
    CommandMap(action="slow", actuator="slow", params={"n": ParamSpec("int")}, timeout=5),
    CommandMap(action="stuck", actuator="slow", params={"n": ParamSpec("int")}, timeout=0.05),
    CommandMap(action="bug", actuator="buggy"),
]


def make() -> tuple[Dispatcher, LogActuator, SlowActuator]:
    relay = LogActuator("relay", LogActuatorConfig(fail_action="fail"), None)  # type: ignore[arg-type]
    slow = SlowActuator()
    buggy = BuggyActuator("buggy", None, None)  # type: ignore[arg-type]
    d = Dispatcher(COMMANDS, {"relay": relay, "slow": slow, "buggy": buggy},
                   DispatchSection(dedupe_window=60))
    return d, relay, slow


def cmd(action: str, params: dict[str, Any], cid: str = "1", uplink: str = "mms", device: str = "") -> Command:
    return Command(cid, uplink, device, action, params)


async def test_valid_command_reaches_actuator_with_typed_params() -> None:
    d, relay, _ = make()
    r = await d.execute(cmd("set_relay", {"channel": "3", "on": "on"}))
    assert (r.ok, r.code) == (True, 200)
    assert relay.actions == [("set", {"channel": 3, "on": True})]
    r = await d.execute(cmd("setpoint", {"value": 21.5}, "2"))
    assert r.ok and relay.actions[-1] == ("setpoint", {"value": 21.5, "register": 40001})


async def test_params_renamed_for_the_actuator() -> None:
    d, relay, _ = make()
    r = await d.execute(cmd("relay_on", {"operand": "5"}))
    assert r.ok and relay.actions == [("set", {"channel": 5, "on": True})]
    r = await d.execute(cmd("relay_on", {"operand": "9"}, "2"))
    assert r.code == 400 and "param 'operand'" in r.message  # errors name the cloud's field


async def test_most_specific_mapping_wins() -> None:
    d, relay, _ = make()
    r = await d.execute(cmd("set_relay", {"on": False}, uplink="enos", device="boiler"))
    assert r.ok
    assert relay.actions == [("set_boiler", {"on": False})]


@pytest.mark.parametrize("action,params,code,fragment", [
    ("open_valve", {}, 404, "no command mapping for action 'open_valve'"),
    ("set_relay", {"channel": 8, "on": True}, 400, "param 'channel': 8 is outside [0, 7]"),
    ("set_relay", {"channel": -1, "on": True}, 400, "outside [0, 7]"),
    ("set_relay", {"channel": 1.5, "on": True}, 400, "expected an integer"),
    ("set_relay", {"channel": "three", "on": True}, 400, "expected a number"),
    ("set_relay", {"channel": True, "on": True}, 400, "expected a number"),
    ("set_relay", {"channel": 1, "on": "maybe"}, 400, "expected a boolean"),
    ("set_relay", {"channel": 1}, 400, "missing param 'on'"),
    ("set_relay", {"channel": 1, "on": True, "force": 1}, 400, "unknown param(s) 'force'"),
    ("set_relay", {"channel": 1, "on": True, "label": {"x": 1}}, 400, "expected a string"),
    ("setpoint", {"value": float("nan")}, 400, "finite"),
    ("setpoint", {"value": 99}, 400, "outside [-10, 45.5]"),
    ("fail", {}, 500, "configured to fail"),
    ("bug", {}, 500, "ZeroDivisionError"),
])
async def test_refusals_and_failures(action: str, params: dict[str, Any], code: int, fragment: str) -> None:
    d, relay, _ = make()
    r = await d.execute(cmd(action, params))
    assert (r.ok, r.code) == (False, code)
    assert fragment in r.message
    assert relay.actions == []


async def test_params_not_an_object() -> None:
    d, _, _ = make()
    r = await d.execute(Command("x", "mms", "", "set_relay", ["not", "a", "dict"]))  # type: ignore[arg-type]
    assert (r.ok, r.code) == (False, 400)


async def test_duplicate_id_runs_once_and_gets_the_first_result() -> None:
    d, relay, _ = make()
    first = await d.execute(cmd("set_relay", {"channel": 1, "on": True}, "dup"))
    again = await d.execute(cmd("set_relay", {"channel": 1, "on": True}, "dup"))
    assert first.ok and again.ok and again.data["duplicate"] is True
    assert len(relay.actions) == 1
    other_uplink = await d.execute(cmd("set_relay", {"channel": 1, "on": True}, "dup", uplink="opshub"))
    assert "duplicate" not in other_uplink.data  # ids are per uplink
    assert len(relay.actions) == 2


async def test_duplicate_while_in_flight_waits_for_the_first() -> None:
    d, _, slow = make()
    a = asyncio.create_task(d.execute(cmd("slow", {"n": 1}, "same")))
    b = asyncio.create_task(d.execute(cmd("slow", {"n": 1}, "same")))
    async with asyncio.timeout(5):
        while d.counts.get("duplicate") != 1:  # b found a in flight and waits on it
            await asyncio.sleep(0)
    assert slow.active == 1 and not a.done() and not b.done()
    slow.release.set()
    ra, rb = await asyncio.gather(a, b)
    assert ra.ok and rb.ok and rb.data.get("duplicate")
    assert len(slow.calls) == 1


async def test_slow_actuator_times_out() -> None:
    d, _, slow = make()
    r = await d.execute(cmd("stuck", {"n": 1}))
    assert (r.ok, r.code) == (False, 504)
    assert "timed out after 0.05s" in r.message
    assert slow.active == 0  # the action was cancelled, not left running


async def test_actions_are_serialized_per_actuator() -> None:
    d, _, slow = make()
    tasks = [asyncio.create_task(d.execute(cmd("slow", {"n": i}, f"s{i}"))) for i in range(5)]
    quick = await d.execute(cmd("set_relay", {"channel": 0, "on": True}, "q"))
    assert quick.ok  # another actuator is not held up by the slow one
    slow.release.set()
    results = await asyncio.gather(*tasks)
    assert all(r.ok for r in results)
    assert slow.max_active == 1
    assert [c["n"] for c in slow.calls] == [0, 1, 2, 3, 4]


async def test_submitted_commands_reply_to_their_uplink() -> None:
    d, relay, _ = make()
    replies: asyncio.Queue[tuple[Command, CommandResult]] = asyncio.Queue()

    async def replier(c: Command, r: CommandResult) -> None:
        await replies.put((c, r))

    d.repliers["mms"] = replier
    runner = asyncio.create_task(d.run())
    try:
        d.submit(cmd("set_relay", {"channel": 2, "on": True}, "a"))
        d.submit(cmd("nope", {}, "b"))
        got = [await asyncio.wait_for(replies.get(), 5) for _ in range(2)]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    by_id = {c.id: r for c, r in got}
    assert by_id["a"].ok and by_id["b"].code == 404
    assert relay.actions == [("set", {"channel": 2, "on": True})]
