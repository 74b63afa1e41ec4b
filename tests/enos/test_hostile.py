"""Hostile cloud messages against the EnOS parsers: an error reply or a clean drop, never a
traceback (Hypothesis, plus 10,000-deep JSON nesting)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import Command
from gatewayd.schema import Secret
from gatewayd.uplinks.base import UplinkContext
from gatewayd.uplinks.engine import Malformed
from gatewayd.uplinks.enos import EnosUplink
from gatewayd.uplinks.enos import protocol as P
from gatewayd.uplinks.enos.config import DeviceMapping, EnosConfig

DEEP = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJ = b'{"id":"1","params":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20)


class _Wire:
    """Stands in for the MQTT connection: records the replies the uplink publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.published.append((topic, payload))


def _uplink() -> EnosUplink:
    cfg = EnosConfig(host="h", product_key="GW", device_key="gw", device_secret=Secret("s"),
                     devices={"relay": DeviceMapping("SUB", "relay-1", Secret("t"))})
    return EnosUplink("enos", cfg, UplinkContext("g", Path("."), None, lambda c: None))  # type: ignore[arg-type]


def test_deep_nesting_is_a_format_error() -> None:
    for payload in (DEEP, DEEP_OBJ):
        try:
            P.parse_envelope(payload)
        except P.EnvelopeError as exc:
            assert exc.code == P.PAYLOAD_FORMAT_ERROR
        else:
            raise AssertionError("accepted a 10,000-deep document")


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_parse_envelope_returns_an_object_or_a_coded_error(payload: bytes) -> None:
    try:
        env = P.parse_envelope(payload)
    except P.EnvelopeError as exc:
        assert exc.code in (P.EMPTY_PAYLOAD, P.PAYLOAD_FORMAT_ERROR)
        return
    assert isinstance(env, dict)
    assert isinstance(P.envelope_id(env), str)
    assert P.reply_code(env) is None or isinstance(P.reply_code(env), int)


@given(st.dictionaries(st.sampled_from(["id", "code", "data", "message", "params"]), json_values))
def test_reply_fields_never_raise(env: dict[str, Any]) -> None:
    P.envelope_id(env)
    P.reply_code(env)


@given(st.text(max_size=200))
def test_topic_parse_never_raises(topic: str) -> None:
    t = P.Topic.parse(topic)
    assert t is None or isinstance(t.path, str)


_topics = st.sampled_from([
    "/sys/SUB/relay-1/thing/service/switch", "/sys/GW/gw/thing/service/measurepoint/set",
    "/sys/SUB/relay-1/thing/service/measurepoint/get", "/ext/session/GW/gw/combine/disable",
    "/ext/session/GW/gw/combine/enable", "/sys/NOPE/x/thing/service/switch", "/sys/a", "#", ""])


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_topics, st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | st.just(DEEP) | st.just(DEEP_OBJ)
       | st.builds(lambda m, p: json.dumps({"id": "7", "method": m, "params": p}).encode(),
                   st.text(max_size=20), json_values))
def test_any_push_becomes_a_command_a_malformed_answer_or_a_reply(topic: str,
                                                                  payload: bytes) -> None:
    up, wire = _uplink(), _Wire()
    got = asyncio.run(up._command(wire, topic, payload))  # type: ignore[arg-type]
    if got is None:  # answered on the spot: always on `<topic>_reply`
        assert all(t == topic + P.REPLY_SUFFIX for t, _ in wire.published)
        return
    cmd, reply_to = got
    assert reply_to == topic
    assert isinstance(cmd, Command | Malformed)
    if payload in (DEEP, DEEP_OBJ):
        assert isinstance(cmd, Malformed)
