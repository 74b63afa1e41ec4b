"""Hostile input on the Operations Hub command poll and publish answers: never a traceback;
a broken subscribe answer gets an error result (once while it repeats), the rest is ignored."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gatewayd.uplinks.engine import Malformed
from gatewayd.uplinks.opshub import loads_lenient, parse_subscribe, publish_verdicts
from tests.opshub.test_protocol import GW, PATTERNS, uplink

from .conftest import Rig, base_table, build_config, wait_until

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=30)
command = st.fixed_dictionaries({}, optional={"dc": st.one_of(st.just(f"{GW}/x"), json_values),
                                              "command": st.one_of(st.just("relay1=on"), json_values)})
answer_like = st.fixed_dictionaries({}, optional={
    "handshake": st.one_of(st.just({"stage": "subscribe"}), json_values),
    "payload": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "request_type": st.one_of(st.sampled_from(["command_list", "no_commands", "result"]),
                                  json_values),
        "commands": st.one_of(json_values, st.lists(st.one_of(command, json_values), max_size=4)),
    }))})
HUGE = json.dumps({"payload": {"request_type": "command_list",
                               "commands": [{"dc": f"{GW}/x", "command": "y" * 2_000_000}]}})
SPECIAL = ['{"payload":' * 10_000, "[" * 10_000 + "]" * 10_000, '{"a":' * 10_000 + "1" + "}" * 10_000,
           HUGE, "\x00\xff\ufffd" * 1000, "", "null", "<html>sign in</html>"]


def check(answer: Any) -> None:
    up, _ = uplink(commands=PATTERNS)
    for _ in range(2):
        pairs = up.handle_poll(answer)  # never raises
        for cmd, reply_to in pairs:
            assert cmd.id and reply_to.dc
            if isinstance(cmd, Malformed):
                assert cmd.message
    commands, _problems = parse_subscribe(answer)
    assert all(isinstance(c.dc, str) and isinstance(c.command, str) for c in commands)
    publish_verdicts(answer, ["a", "b"])
    publish_verdicts(answer, ["a"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(answer_like, json_values))
def test_any_subscribe_answer(answer: Any) -> None:
    check(answer)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_answer_text_is_json_or_a_value_error(text: str) -> None:
    try:
        check(loads_lenient(text))
    except ValueError:
        pass  # the transport's cue for "not JSON": a login page, a re-login


def test_nested_huge_and_binary_answers() -> None:
    for text in SPECIAL:
        try:
            answer = loads_lenient(text)
        except ValueError:
            continue
        check(answer)


async def test_hostile_subscribe_answers_on_a_live_session(sim, rig: Rig) -> None:
    bodies = ['{"payload":' * 10_000, HUGE, "\x00\xff" * 500, '{"handshake":{"stage":"subscribe"}}']
    for body in bodies:
        sim.inject("raw", "subscribe", count=3, body=body)
    with capture_logs() as logs:
        rig.start(build_config(base_table(sim, poll_interval="10ms")))
        await sim.wait_for(lambda: sim.stats["fault_raw"] >= 12, timeout_s=20)
        await wait_until(lambda: len(sim.rows(metric="cmd_result")) >= 2, 10, "error results")
    results = sim.rows(metric="cmd_result")
    assert {r["data"] for r in results} == {"400"}
    assert len(results) <= 4  # once per broken answer while it repeats, not once per poll
    warnings = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert len(warnings) <= 10, [e["event"] for e in warnings]
    assert not any("Traceback" in json.dumps(e, default=str) for e in logs)
    assert rig.uplink is not None and rig.uplink.state.value == "connected"
