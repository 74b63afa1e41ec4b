"""Hostile input on the MMS command paths (answer frames, pushes over WebSocket and HTTP):
never a traceback; every push that is no command gets an error result, and repeated warnings
are rate-limited."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gatewayd.uplinks.mms.codec import CommandFields, classify, classify_frame, parse_json, read_pushes
from gatewayd.uplinks.mms.transport import WsChannel
from gatewayd_sim.mms import DEFAULT_DEVICE_ID, RESULT_TYPE
from tests.mms.conftest import base_config

FIELDS = CommandFields(("m0t0y0p0e3",), "opcode", "", "cmd_id", "relay")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=30)
push_like = st.fixed_dictionaries(
    {"messages": st.one_of(json_values, st.lists(st.one_of(json_values, st.fixed_dictionaries(
        {"opcode": json_values}, optional={"operand": json_values, "cmd_id": json_values}))))},
    optional={"messageType": st.one_of(st.just("m0t0y0p0e3"), json_values), "sender": json_values})


def nested(depth: int) -> str:
    return '{"messages":' + "[" * depth + "]" * depth + "}"


HUGE = '{"messageType":"m0t0y0p0e3","messages":[{"opcode":"' + "x" * 2_000_000 + '"}]}'
SPECIAL = [nested(10_000), "[" * 10_000, '{"a":' * 10_000, HUGE, "\x00\xff\ufffd" * 1000, "", "null",
           '{"msg": {"code": [1]}}', '{"msg": "OK", "code": true}', '{"msg": "OK", "code": "2000"}']


class Sink:
    def __init__(self) -> None:
        self.pushes: list[dict[str, Any]] = []
        self.malformed: list[str] = []


def channel(sink: Sink) -> WsChannel:
    return WsChannel(base_config_for_units(), None, sink.pushes.append, sink.malformed.append)  # type: ignore[arg-type]


def base_config_for_units() -> Any:
    class _Sim:
        url = "http://127.0.0.1:1"
    return base_config(_Sim())  # type: ignore[arg-type]


def check_frame(text: str) -> None:
    sink = Sink()
    channel(sink)._on_text(text)  # never raises
    assert len(sink.pushes) + len(sink.malformed) <= 1
    for env in sink.pushes:
        for pc in read_pushes([env], FIELDS, "t"):
            assert pc.id and (bool(pc.problem) != bool(pc.action))
    for raw in sink.malformed:
        (pc,) = read_pushes([raw], FIELDS, "t")
        assert pc.problem == "not a push envelope"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(push_like, json_values))
def test_any_json_frame_is_a_push_an_answer_or_malformed(value: Any) -> None:
    check_frame(json.dumps(value))
    if isinstance(value, dict):
        classify_frame(value, "sync")  # an answer of any shape: never raises


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_frame(text: str) -> None:
    check_frame(text)
    classify(200, text, "sync")
    classify(400, text, "async")


def test_nested_huge_and_binary_frames() -> None:
    for text in SPECIAL:
        check_frame(text)
        classify(200, text, "sync")
    assert parse_json("[" * 10_000 + "]" * 10_000) is None  # too deep to decode: not JSON


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(push_like, json_values), max_size=5))
def test_a_poll_of_anything_gives_one_verdict_per_message(envelopes: list[Any]) -> None:
    out = read_pushes(envelopes, FIELDS, "t")
    expected = sum(len(e["messages"]) if isinstance(e, dict) and isinstance(e.get("messages"), list)
                   else 1 for e in envelopes)
    assert len(out) == expected
    assert all(pc.id for pc in out)


async def test_hostile_frames_on_a_live_socket_get_error_results_and_few_log_lines(sim, make_harness):
    h = await make_harness(sim, base_config(sim))
    await sim.wait_for(lambda: sim.connected(DEFAULT_DEVICE_ID))
    with capture_logs() as logs:
        for text in [nested(10_000), "[" * 10_000, HUGE, "\x00\xff" * 500] * 5:
            assert await sim.send_raw(DEFAULT_DEVICE_ID, text)
        await sim.wait_for(lambda: sim.count(RESULT_TYPE) >= 20, timeout_s=20)
    rows = sim.rows(RESULT_TYPE)
    # malformed: 400; the huge one is a well-formed command nobody mapped: 404
    assert sorted({(r["C_CODE"], r["C_OK"]) for r in rows}) == [(400, False), (404, False)]
    warnings = [e for e in logs if e["log_level"] in ("warning", "error")
                and e["event"] != "command_done"]  # each command's result is logged, by design
    assert len(warnings) <= 6, [e["event"] for e in warnings]  # rate-limited, not one per frame
    assert not any("Traceback" in json.dumps(e, default=str) for e in logs)
    assert h.uplink.state.value == "connected"
