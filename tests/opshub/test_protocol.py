"""Pure protocol logic of the uplink: formats, message building, answer parsing, config checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Command, Quality, Reading
from gatewayd.schema import Builder
from gatewayd.uplinks.base import Item, UplinkContext
from gatewayd.uplinks.opshub import (
    Metric,
    OpsHubConfig,
    OpsHubUplink,
    PolledCommand,
    TimeFormat,
    build_messages,
    command_key,
    format_value,
    loads_lenient,
    parse_subscribe,
    primary_mac,
    publish_verdicts,
)

GW = "ACC/gw-1"


def config(**over: Any) -> tuple[OpsHubConfig | None, list[str]]:
    table = {"url": "https://hub.example.com", "username": "ACC", "password": "pw",
             "gateway_id": "gw-1", **over}
    b = Builder(env={})
    return b.build(OpsHubConfig, table, "uplinks.hub"), b.errors


class NullOutbox:
    """Stand-in outbox for pure parsing tests: nothing is ever leased."""

    name = "hub"

    def set_connected(self, connected: bool) -> None:
        pass

    def pending(self) -> int:
        return 0


def uplink(**over: Any) -> tuple[OpsHubUplink, list[Command]]:
    cfg, errors = config(**over)
    assert not errors, errors
    submitted: list[Command] = []
    ctx = UplinkContext("gw", Path("."), NullOutbox(), submitted.append)  # type: ignore[arg-type]
    return OpsHubUplink("hub", cfg, ctx), submitted


# -- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "ts_ms", "text"), [
    ("+00:00", 0, "1970-01-01T00:00:00.000+00:00"),
    ("+09:00", 1427363078195, "2015-03-26T18:44:38.195+09:00"),
    ("-05:30", 1427363078195, "2015-03-26T04:14:38.195-05:30"),
    ("+00:00", 253402300799999, "9999-12-31T23:59:59.999+00:00"),
])
def test_time_format_matches_the_page(offset: str, ts_ms: int, text: str) -> None:
    assert TimeFormat(offset)(ts_ms) == text


def test_time_outside_four_digit_years_is_refused() -> None:
    with pytest.raises((ValueError, OverflowError)):
        TimeFormat()(253402300800000)  # year 10000


@pytest.mark.parametrize(("value", "expected"), [
    (71.5, ("71.5", "Number")), (100.0, ("100", "Number")), (7, ("7", "Number")),
    (-0.001, ("-0.001", "Number")), (1e20, ("1e+20", "Number")), (True, ("true", "String")),
    ("on", ("on", "String")), (None, ("", "String")),
    ({"b": 1, "a": [2]}, ('{"a":[2],"b":1}', "String")),
])
def test_values_are_sent_as_strings_with_a_type(value: Any, expected: tuple[str, str]) -> None:
    assert format_value(value) == expected


def test_primary_mac_has_the_page_form() -> None:
    assert re.fullmatch(r"([0-9a-f]{2}-){5}[0-9a-f]{2}", primary_mac())


def test_gateway_id_defaults_to_the_mac() -> None:
    up, _ = uplink(gateway_id="")
    assert up.gateway_dc == f"ACC/{primary_mac()}"


# -- building and reading messages ---------------------------------------------------------------


def test_messages_group_channels_then_time_and_position_in_first_seen_order() -> None:
    pos = (("alt", "5"), ("lat", "1.000000"), ("long", "2.000000"))
    ms = [Metric(None, f"{GW}/a", "T1", pos, {"met": "x", "val": "1"}),
          Metric(None, f"{GW}/b", "T1", (), {"met": "y", "val": "2"}),
          Metric(None, f"{GW}/a", "T2", pos, {"met": "x", "val": "3"}),
          Metric(None, f"{GW}/a", "T1", pos, {"met": "z", "val": "4"}),
          Metric(None, f"{GW}/a", "T1", (), {"met": "w", "val": "5"})]
    assert build_messages(ms, "C") == [
        {"dc": f"{GW}/a", "cloud": "C", "data": [
            {"alt": "5", "lat": "1.000000", "long": "2.000000", "time": "T1",
             "mets": [{"met": "x", "val": "1"}, {"met": "z", "val": "4"}]},
            {"alt": "5", "lat": "1.000000", "long": "2.000000", "time": "T2",
             "mets": [{"met": "x", "val": "3"}]},
            {"time": "T1", "mets": [{"met": "w", "val": "5"}]}]},
        {"dc": f"{GW}/b", "cloud": "C", "data": [{"time": "T1",
                                                  "mets": [{"met": "y", "val": "2"}]}]}]


def test_metrics_map_points_gps_and_quality() -> None:
    up, _ = uplink(devices={"boiler": {"sensor": "boiler7", "points": {
        "temperature_c": {"met": "temperature", "desc": "degC", "gen1": "zone-a"}}}},
        gps={"device": "gps", "decimals": 3}, send_unmapped=False)
    items = [Item(1, Reading("gps", "lat", 35.5875621, 1000), False),
             Item(2, Reading("gps", "long", 139.66, 1000), False),
             Item(3, Reading("boiler", "temperature_c", 71.5, 1000, Quality.UNCERTAIN), False),
             Item(4, Reading("boiler", "pump", "on", 1000), True),
             Item(5, Reading("fan", "rpm", 900, 1000), False)]
    out = up.metrics_for(items)
    assert [(m.item.seq, m.dc, m.time, m.position, m.met) for m in out] == [  # type: ignore[union-attr]
        (3, f"{GW}/boiler7", "1970-01-01T00:00:01.000+00:00",
         (("lat", "35.588"), ("long", "139.660")),
         {"met": "temperature", "val": "71.5", "type": "Number", "desc": "degC",
          "gen1": "zone-a", "gen2": "uncertain"}),
        (4, f"{GW}/boiler7", "1970-01-01T00:00:01.000+00:00",
         (("lat", "35.588"), ("long", "139.660")), {"met": "pump", "val": "on", "type": "String"}),
    ]


@pytest.mark.parametrize(("answer", "channels", "verdicts", "single"), [
    ({"handshake": {"stage": "publish", "code": "1", "dc": "a"}}, ["a"], {"a": True}, False),
    ({"handshake": {"stage": "publish", "code": 0, "dc": "a"}}, ["a"], {"a": False}, False),
    ([{"handshake": {"stage": "publish", "code": 1, "dc": "a"}},
      {"handshake": {"stage": "publish", "code": "0", "dc": "b"}}, "junk", {"handshake": 3}],
     ["a", "b", "c"], {"a": True, "b": False}, False),
    # one channel published, the answer names none: it can only answer that channel
    ({"handshake": {"stage": "publish", "code": "1"}}, ["a"], {"a": True}, False),
    # several published, one object: sure only of the channel it names
    ({"handshake": {"stage": "publish", "code": "1", "dc": "a"}}, ["a", "b"], {"a": True}, True),
    ({"handshake": {"stage": "publish", "code": "1", "dc": "b"}}, ["a", "b"], {"b": True}, True),
    ({"handshake": {"stage": "publish", "code": "1"}}, ["a", "b"], {}, True),
    # a channel we did not publish, a code that is neither 0 nor 1: no verdict
    ({"handshake": {"stage": "publish", "code": "1", "dc": "z"}}, ["a"], {}, False),
    ({"handshake": {"stage": "publish", "code": "7", "dc": "a"}}, ["a"], {}, False),
    ({"handshake": {"stage": "publish", "dc": "a"}}, ["a"], {}, False),
    ("nonsense", ["a"], {}, False),
])
def test_publish_verdicts(answer: Any, channels: list[str], verdicts: dict[str, bool],
                          single: bool) -> None:
    assert publish_verdicts(answer, channels) == (verdicts, single)


@pytest.mark.parametrize(("text", "commands", "problems"), [
    # verbatim shapes from the vendor page (with their typos)
    ('{"handshake":{"stage":"subscribe"},"payload":{"request_type":command_list", commands: '
     '[{"dc":"<channel>","command":"<command>"}]}}', [PolledCommand("<channel>", "<command>")], 0),
    ('{"handshake":{"stage":"subscribe"},"token":"<token>","payload":{"request_type":'
     '" no_commands","dc":"<channel>"}}', [], 0),
    ('{"handshake":{"stage":"subscribe"},"payload":{"request_type":"result","ok":1}}', [], 0),
    ('{"handshake":{"stage":"subscribe"},"payload":{"request_type":"command_list",'
     '"commands":[{"dc":"a","command":"x"},{"dc":"b"},7]}}', [PolledCommand("a", "x")], 2),
    ('{"handshake":{"stage":"subscribe"},"payload":{"request_type":"command_list",'
     '"commands":{"dc":"a"}}}', [], 1),
    ('{"handshake":{"stage":"subscribe"},"payload":{"request_type":"weird"}}', [], 1),
    ('{"handshake":{"stage":"subscribe"}}', [], 1),
    ("[]", [], 1),
])
def test_parse_subscribe(text: str, commands: list[PolledCommand], problems: int) -> None:
    got, probs = parse_subscribe(loads_lenient(text))
    assert got == commands and len(probs) == problems


def test_lenient_json_still_refuses_html() -> None:
    with pytest.raises(ValueError):
        loads_lenient("<html><body>Sign in</body></html>")


# -- commands ------------------------------------------------------------------------------------

PATTERNS = [
    {"pattern": r"relay(?P<channel>\d)=(?P<state>on|off)", "action": "relay", "device": "relays"},
    {"pattern": r"SET (?P<channel>\d+) (?P<value>\S+)", "action": "set", "channel": "pump",
     "types": {"channel": "int", "value": "float"}},
    {"pattern": r"(?P<action>AT\+\w+)(?:=(?P<arg>.*))?"},
]


@pytest.mark.parametrize(("text", "channel", "parsed"), [
    ("relay1=on", "", ("relays", "relay", {"channel": "1", "state": "on"})),
    (" relay2=off ", "pump", ("relays", "relay", {"channel": "2", "state": "off"})),
    ("SET 2 45.5", "pump", ("pump", "set", {"channel": 2, "value": 45.5})),
    ("AT+RST", "modem", ("modem", "AT+RST", {})),
    ("AT+BAUD=9600", "", ("", "AT+BAUD", {"arg": "9600"})),
])
def test_parse_command(text: str, channel: str, parsed: tuple) -> None:
    up, _ = uplink(commands=PATTERNS)
    assert up.parse_command(text, channel) == parsed


@pytest.mark.parametrize(("text", "channel", "why"), [
    ("SET 2 45.5", "fan", "no command pattern matches"),  # SET only on the pump channel
    ("SET 2 4x5", "pump", "is not a valid float"),
    ("relay1=maybe", "", "no command pattern matches"),
])
def test_unparseable_commands(text: str, channel: str, why: str) -> None:
    up, _ = uplink(commands=PATTERNS)
    with pytest.raises(ValueError, match=why):
        up.parse_command(text, channel)


def _poll(*commands: str) -> dict[str, Any]:
    return {"payload": {"request_type": "command_list",
                        "commands": [{"dc": f"{GW}/x", "command": c} for c in commands]}}


def test_a_server_that_keeps_commands_runs_each_once() -> None:
    up, _ = uplink(commands=PATTERNS)
    first = up.handle_poll(_poll("relay1=on", "relay1=on"))  # pressed twice: both run
    assert len(first) == 2 and first[0][0].id != first[1][0].id
    assert [c.params for c, _ in first] == [{"channel": "1", "state": "on"}] * 2
    assert up.handle_poll(_poll("relay1=on", "relay1=on")) == []  # returned again: kept
    assert up._keeps is True
    (new,) = up.handle_poll(_poll("relay1=on", "relay1=on", "relay2=off"))  # only the new one
    assert new[0].params == {"channel": "2", "state": "off"}
    assert up.handle_poll({"payload": {"request_type": "no_commands"}}) == []
    again = up.handle_poll(_poll("relay1=on"))  # gone, then back: issued again
    assert len(again) == 1 and again[0][0].id not in {c.id for c, _ in first}


def test_a_server_that_consumes_commands_runs_a_deliberate_repeat() -> None:
    up, _ = uplink(commands=PATTERNS)
    assert len(up.handle_poll(_poll("relay1=on"))) == 1
    assert len(up.handle_poll(_poll("relay1=off"))) == 1  # the first is gone: consumed on read
    assert up._keeps is False
    ids = [c.id for c, _ in up.handle_poll(_poll("relay1=on"))]
    ids += [c.id for c, _ in up.handle_poll(_poll("relay1=on"))]  # on, on again: both run
    assert len(set(ids)) == 2


def test_command_key_depends_on_channel_string_and_ordinal() -> None:
    keys = {command_key(dc, c, o) for dc in ("a", "b") for c in ("x", "y") for o in (0, 1)}
    assert len(keys) == 8


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("over", "error"), [
    ({"url": "http://hub"}, "use https:// or set allow_http = true"),
    ({"url": "hub.example.com"}, "url must start with https://"),
    ({"utc_offset": "+9"}, "utc_offset must look like"),
    ({"gateway_id": "my gw"}, "must not contain spaces"),
    ({"ca_bundle": "/nonexistent/ca.pem"}, "is not a readable file"),
    ({"commands": [{"pattern": "(unclosed"}]}, "is not a valid regex"),
    ({"commands": [{"pattern": "x"}]}, "set `action`"),
    ({"commands": [{"pattern": "(?P<a>x)", "action": "y", "types": {"b": "int"}}]},
     "types names groups the pattern lacks: b"),
    ({"devices": {"d": {"sensor": "a/b"}}}, "must not contain spaces or '/'"),
    ({"max_batch": 0}, "expected a value from 1 to 100000"),
    ({"typo_key": 1}, "unknown key"),
])
def test_config_errors_are_clear(over: dict[str, Any], error: str) -> None:
    cfg, errors = config(**over)
    assert cfg is None and any(error in e for e in errors), errors


def test_config_defaults() -> None:
    cfg, errors = config()
    assert not errors and cfg is not None
    assert (cfg.poll_interval, cfg.max_batch, cfg.utc_offset, cfg.account) == (5.0, 2000,
                                                                               "+00:00", "")
    assert "pw" not in repr(cfg)
